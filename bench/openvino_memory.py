"""OpenVINO's process memory through a validation's phases, with one compiled copy of the model
against two (the runner's one_compiled_copy), side by side in one run.

LLMPipeline compiles the IR for generation and the runner's logits() compiles it again for
teacher-forced logits. An int4 IR with Phi-3-mini's layer shapes (--layers N, random weights) is
opened in a fresh process per mode, which then runs what validation runs: logits, greedy
generation, logits again; process memory (resident, not mapped file pages) after each.

Usage: python bench/openvino_memory.py [--layers 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PHASES = ("open", "logits", "generate", "logits again")


def rss_anon_mb() -> float:
    """Resident memory less mapped file pages, as bench/convert.py's watched() counts it."""
    import psutil

    info = psutil.Process().memory_info()
    return (info.rss - info.shared) / 2**20


def child(model: Path, one_copy: bool) -> dict[str, float]:
    from toolkit.runner import openvino_rt
    from toolkit.runner.core import Sampling

    out = {}
    session = openvino_rt.open_session(model, {"one_compiled_copy": one_copy})
    out["open"] = rss_anon_mb()
    ids = list(range(1, 129))
    for phase in PHASES[1:]:
        if phase == "generate":
            list(session.generate(ids, Sampling(max_new_tokens=8)))
        else:
            session.logits(ids)
        gc.collect()
        out[phase] = rss_anon_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1] == "one")))
        return
    from runtime import convert
    from shapes import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        source = make_checkpoint(Path(tmp) / "ckpt", args.layers)
        model = convert("openvino-int4", source, Path(tmp) / "openvino-int4")
        ir_mb = (model / "openvino_model.bin").stat().st_size / 2**20
        rows = {}
        for mode in ("two", "one"):
            proc = subprocess.run([sys.executable, __file__, "--child", str(model), mode],
                                  capture_output=True, text=True, check=True)
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"OpenVINO int4 IR of {args.layers} layers of Phi-3-mini's shape: {ir_mb:.0f} MB; "
          "process memory (resident less file pages, MB) after each phase")
    print(f"{'compiled copies':<16}" + "".join(f"{p:>14}" for p in PHASES) + f"{'peak':>8}")
    for mode, row in rows.items():
        print(f"{mode:<16}" + "".join(f"{row[p]:>14.0f}" for p in PHASES)
              + f"{max(row.values()):>8.0f}")
    saved = max(rows["two"].values()) - max(rows["one"].values())
    print(f"one copy at a time saves {saved:.0f} MB at the peak: {saved / ir_mb:.2f} x the IR")


if __name__ == "__main__":
    main()
