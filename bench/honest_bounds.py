"""What honest bundles of the embedded tiny-phi3 measure, per backend x precision, and the default
bounds derived from it (toolkit/backends/common.py Honest.bounds): the figures each backend
module's `honest` table holds. Builds with the real CLI into a temporary directory (conversions
come from the cache) and prints, side by side, the measured figures, the table entry to paste,
and the bounds in force now.

Usage: python bench/honest_bounds.py [--backends onnx,openvino,gguf,mlx] [--precisions int4,int8,fp32]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolkit.backends import BACKENDS  # noqa: E402
from toolkit.backends.common import Honest  # noqa: E402
from toolkit.runner.core import host_cpu  # noqa: E402

FIELDS = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match_mean")


def measure(backend: str, precision: str, out: Path) -> dict | None:
    be = BACKENDS[backend]
    proc = subprocess.run([str(Path(sys.executable).parent / "phikit"), "build",
                           f"recipes/tiny-phi3-{precision}.yaml", "--target", be.home_target,
                           "--backend", backend, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    for bundle in (out, out.with_name(out.name + ".failed")):
        if (bundle / "parity.json").is_file():
            return json.loads((bundle / "parity.json").read_text())["metrics"]
    print(f"  {backend} {precision}: build exit {proc.returncode}: "
          f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="onnx,openvino,gguf,mlx")
    ap.add_argument("--precisions", default="int4,int8,fp32")
    args = ap.parse_args()
    cpu = host_cpu()
    print(f"host: {cpu.get('model') or platform.processor()} ({platform.machine()}, "
          f"{cpu.get('class')})")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for precision in args.precisions.split(","):
                m = measure(backend, precision, Path(tmp) / f"{backend}-{precision}")
                if m is None:
                    continue
                honest = Honest(**{f: round(m[f], 4) if f in ("top1", "ppl_ratio")
                                   else float(f"{m[f]:.3g}") for f in FIELDS})
                now = BACKENDS[backend].default_thresholds(precision)
                print(f"{backend:9} {precision:5} measured " +
                      " ".join(f"{f}={m[f]:.4g}" for f in FIELDS))
                print(f"{'':15} entry    \"{precision}\": {honest!r},")
                print(f"{'':15} derived  {honest.bounds()}")
                print(f"{'':15} in force {now}")


if __name__ == "__main__":
    main()
