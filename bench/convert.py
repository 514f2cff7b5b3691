"""Conversion cost per backend x precision: wall time and peak RSS of the real tool, side by side.

Each conversion runs in a fresh process through phikit's own backend (which runs the tool as a
child), and the peak resident set of that child is read from getrusage(RUSAGE_CHILDREN). Source:
the embedded tiny-phi3 by default, or random weights with Phi-3-mini's layer shapes (--layers N).

Usage: python bench/convert.py [--layers N] [--backends onnx,openvino,gguf,mlx] [--precisions int4,int8,fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))



def one(backend: str, precision: str, source: Path, out: Path) -> None:
    """Child process: convert once, print JSON with wall time and the tool's peak RSS."""
    from shapes import target_for
    from toolkit.backends import BACKENDS
    from toolkit.schema import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"tiny-phi3-{precision}.yaml")
    target = target_for(backend)
    start = time.perf_counter()
    BACKENDS[backend].convert(source, out, recipe, target, log=lambda s: None)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"seconds": wall, "peak_rss_mb": peak_kb / 1024, "size_mb": size / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="0 = the embedded tiny-phi3")
    ap.add_argument("--source", type=Path, help="an existing checkpoint (e.g. from a previous "
                    "--layers run, kept with --keep)")
    ap.add_argument("--keep", type=Path, help="make the --layers checkpoint here and keep it")
    ap.add_argument("--backends", default="onnx,openvino,gguf,mlx")
    ap.add_argument("--precisions", default="int4,int8,fp32")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        backend, precision, source, out = args.one
        one(backend, precision, Path(source), Path(out))
        return
    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        if args.source:
            source = args.source
        elif args.layers:
            from shapes import make_checkpoint

            source = make_checkpoint(args.keep or Path(tmp) / "ckpt", args.layers)
        else:
            source = REPO / "models" / "tiny-phi3"
        ckpt_mb = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e6
        print(f"source: {source.name} ({ckpt_mb:.0f} MB of safetensors); wall time and peak RSS "
              "of each conversion (the tool's process)")
        print(f"{'backend':<9} {'precision':<9} {'seconds':>8} {'peak RSS MB':>12} "
              f"{'x checkpoint':>13} {'artifact MB':>12}")
        for backend in args.backends.split(","):
            for precision in args.precisions.split(","):
                out = Path(tmp) / f"{backend}-{precision}"
                proc = subprocess.run([sys.executable, __file__, "--one", backend, precision,
                                       str(source), str(out)], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{backend:<9} {precision:<9} failed: "
                          f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{backend:<9} {precision:<9} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                      f"{r['peak_rss_mb'] / ckpt_mb:>13.1f} {r['size_mb']:>12.1f}")


if __name__ == "__main__":
    main()
