"""What honest bundles of the embedded tiny-phi3 measure, per backend x precision, and the default
bounds derived from it (toolkit/backends/common.py Honest.bounds): the figures each backend
module's `honest` table holds. Builds with the real CLI into a temporary directory (conversions
come from the cache); where the runtime picks its numerics per CPU (a backend's honest_numerics:
OpenVINO's bf16 and dynamic quantization), validates the bundle again under each, so one machine
with bf16 and VNNI measures what every CPU class computes. Prints, side by side, the measured
figures, the table entry to paste (the worst of them) and the bounds in force now.

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

PHIKIT = str(Path(sys.executable).parent / "phikit")
FIELDS = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "greedy_match_mean", "kld_p999")


def build(backend: str, precision: str, out: Path) -> Path | None:
    """The honest bundle (its directory, `.failed` when the bounds in force refused it)."""
    proc = subprocess.run([PHIKIT, "build",
                           f"recipes/tiny-phi3-{precision}.yaml", "--target",
                           BACKENDS[backend].home_target, "--backend", backend, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    for bundle in (out, out.with_name(out.name + ".failed")):
        if (bundle / "parity.json").is_file():
            return bundle
    print(f"  {backend} {precision}: build exit {proc.returncode}: "
          f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return None


def validate(bundle: Path, options: dict) -> dict:
    """The bundle's report, validated again under `options` (runtime options over its own)."""
    report = bundle.with_name(bundle.name + ".report.json")
    args = [a for k, v in options.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    report.unlink(missing_ok=True)  # never the report of the numerics before
    proc = subprocess.run([PHIKIT, "validate", str(bundle), *args, "--json", str(report)],
                          cwd=REPO, capture_output=True, text=True)
    if not report.is_file():
        sys.exit(f"{bundle.name} {options}: validate exit {proc.returncode}: "
                 f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    return json.loads(report.read_text())


def measurements(backend: str, bundle: Path) -> dict[str, dict]:
    """name -> report: the build's own, or one per numerics the runtime may pick on some CPU
    (the backend's honest_numerics) for the options the bundle leaves to the runtime."""
    pinned = json.loads((bundle / "manifest.json").read_text())["runtime"]["options"]
    numerics = {name: options for name, options in BACKENDS[backend].honest_numerics.items()
                if not set(options) & set(pinned)}
    if not numerics:
        return {"as built": json.loads((bundle / "parity.json").read_text())}
    return {name: validate(bundle, options) for name, options in numerics.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="onnx,openvino,gguf,mlx")
    ap.add_argument("--precisions", default="int4,int8,fp32")
    args = ap.parse_args()
    cpu = host_cpu()
    print(f"host: {cpu.get('model') or platform.processor()} ({platform.machine()}, "
          f"{cpu.get('class')}: {' '.join(cpu['features'])})")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for precision in args.precisions.split(","):
                bundle = build(backend, precision, Path(tmp) / f"{backend}-{precision}")
                if bundle is None:
                    continue
                measured = []
                for name, report in measurements(backend, bundle).items():
                    m = report["metrics"]
                    executed = report["candidate"].get("executed_precision")
                    print(f"{backend:9} {precision:5} {name}: " +
                          " ".join(f"{f}={m[f]:.4g}" for f in FIELDS) +
                          (f" (executed: {executed})" if executed else ""))
                    measured.append(Honest(**{f: round(m[f], 4) if f in ("top1", "ppl_ratio")
                                              else float(f"{m[f]:.3g}") for f in FIELDS}))
                honest = measured[0].worst(*measured[1:])
                now = BACKENDS[backend].default_thresholds(precision)
                print(f"{'':15} entry    \"{precision}\": {honest!r},")
                print(f"{'':15} derived  {honest.bounds()}")
                print(f"{'':15} in force {now}")


if __name__ == "__main__":
    main()
