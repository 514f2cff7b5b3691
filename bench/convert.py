"""Conversion cost per backend x precision: wall time and peak RSS of the real tool, side by side.

Each conversion runs in a fresh process through phikit's own backend (which runs the tool as a
child), and the peak resident set of that child is read from getrusage(RUSAGE_CHILDREN). Source:
the embedded tiny-phi3 by default, or random weights with Phi-3-mini's layer shapes (--layers N).

Backends: phikit's (onnx runs the ORT GenAI builder streamed, see toolkit/backends/onnx_stream.py;
openvino runs optimum-cli streamed, see toolkit/backends/openvino_stream.py), and as they ship:
onnx-builder (the same builder arguments through the builder itself) and openvino-cli (the same
optimum-cli arguments through optimum-cli itself).

With --build RECIPE, each backend's bundle is then built from the same checkpoint with
`phikit build` (convert, reference, validate, package) as one watched process tree, and its
time, peak memory and verdict are printed. The builds share one phikit cache, so the reference
is computed once; --cache keeps it across runs (a disk that holds one backend's full-size files
at a time: the checkpoint, the converter's float intermediate, the artifact and the bundle).

Usage: python bench/convert.py [--layers N [--shape mini|medium]] [--backends onnx,openvino,gguf,mlx]
       [--precisions int4,int8,fp32] [--rss-limit-gb G] [--generate N]
       [--build RECIPE [--build-only] [--cache DIR]]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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
    from shapes import shape_recipe, target_for
    from toolkit.backends import BACKENDS

    if backend == "onnx-builder":  # the ORT GenAI builder as it ships, not streamed
        import toolkit.backends.onnx as onnx_backend

        backend, onnx_backend.STREAMED_BUILDER = "onnx", onnx_backend.BACKEND.tool
    if backend == "openvino-cli":  # optimum-cli as it ships, not streamed
        import toolkit.backends.openvino as openvino_backend

        backend, openvino_backend.STREAMED_EXPORT = "openvino", "optimum.commands.optimum_cli"
    target = target_for(backend)
    recipe = shape_recipe(backend, precision)
    start = time.perf_counter()
    BACKENDS[backend].convert(source, out, recipe, target, log=lambda s: None)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"seconds": wall, "peak_rss_mb": peak_kb / 1024, "size_mb": size / 1e6}))


def run_artifact(backend: str, precision: str, out: Path, tokens: int) -> None:
    """Child process: open the converted artifact with the runner that ships in bundles (the
    target's options), generate `tokens` greedy tokens, print JSON with the speed."""
    from shapes import shape_recipe, target_for
    from toolkit.backends import BACKENDS
    from toolkit.runner.core import Sampling, open_session

    backend = {"onnx-builder": "onnx", "openvino-cli": "openvino"}.get(backend, backend)
    recipe = shape_recipe(backend, precision)
    start = time.perf_counter()
    session = open_session(BACKENDS[backend].runtime_module, out,
                           BACKENDS[backend].runtime_options(target_for(backend), recipe))
    load = time.perf_counter() - start
    ids = session.tokenize("The capital of France is")
    stamps = [time.perf_counter() for _ in session.generate(
        ids, Sampling(max_new_tokens=tokens, stop_token_ids=()))]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    print(json.dumps({"load_s": load, "generated": len(stamps), "tok_s": rate}))


def watched(cmd: list[str], limit_mb: float | None) -> tuple[subprocess.CompletedProcess,
                                                                  dict[str, float], bool]:
    """Run `cmd`; sample the memory of its whole process tree twice a second and stop the tree
    if its anonymous memory passes `limit_mb` (a conversion that would not fit must not take the
    machine down with it). Resident pages of memory-mapped files (safetensors shards read in
    place) count in RSS but the kernel can drop them; anonymous memory is what runs a machine
    out. (process, {"rss": peak MB, "anon": peak MB}, stopped?)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, peak, stopped = psutil.Process(proc.pid), {"rss": 0.0, "anon": 0.0}, False
    while proc.poll() is None:
        rss = anon = 0.0
        try:
            tree = [parent, *parent.children(recursive=True)]
            for p in tree:
                info = p.memory_info()
                rss += info.rss / 1e6
                anon += (info.rss - info.shared) / 1e6
        except psutil.Error:
            tree = []
        peak = {"rss": max(peak["rss"], rss), "anon": max(peak["anon"], anon)}
        if limit_mb and anon > limit_mb:
            for p in reversed(tree):
                try:
                    p.kill()
                except psutil.Error:
                    pass
            stopped = True
            break
        time.sleep(0.5)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak, stopped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="0 = the embedded tiny-phi3")
    ap.add_argument("--source", type=Path, help="an existing checkpoint (e.g. from a previous "
                    "--layers run, kept with --keep)")
    ap.add_argument("--keep", type=Path, help="make the --layers checkpoint here and keep it")
    ap.add_argument("--backends", default="onnx,openvino,gguf,mlx")
    ap.add_argument("--precisions", default="int4,int8,fp32")
    ap.add_argument("--shape", choices=("mini", "medium"), default="mini",
                    help="the published checkpoint whose layer shapes --layers uses")
    ap.add_argument("--rss-limit-gb", type=float, default=None,
                    help="stop a conversion whose processes' anonymous memory passes this")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="then run each artifact with its runner: N greedy tokens (its own "
                    "process, its own peak memory)")
    ap.add_argument("--build", type=Path, metavar="RECIPE",
                    help="then build each backend's bundle from the checkpoint with this recipe")
    ap.add_argument("--build-only", action="store_true",
                    help="with --build: skip the standalone conversions (the builds convert)")
    ap.add_argument("--cache", type=Path, help="with --build: the builds' phikit cache (default: "
                    "a new one, removed after); one kept across runs computes the reference once "
                    "when the disk holds one backend's files at a time")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--run", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        backend, precision, source, out = args.one
        one(backend, precision, Path(source), Path(out))
        return
    if args.run:
        backend, precision, out, tokens = args.run
        run_artifact(backend, precision, Path(out), int(tokens))
        return
    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        if args.source:
            source = args.source
        elif args.layers:
            from shapes import make_checkpoint

            source = make_checkpoint(args.keep or Path(tmp) / "ckpt", args.layers,
                                     shape=args.shape)
        else:
            source = REPO / "models" / "tiny-phi3"
        ckpt_mb = sum(p.stat().st_size for p in source.glob("*.safetensors")) / 1e6
        print(f"source: {source.name} ({ckpt_mb:.0f} MB of safetensors); wall time and peak RSS "
              "of each conversion (the tool's process)")
        print(f"{'backend':<9} {'precision':<9} {'seconds':>8} {'peak RSS MB':>12} "
              f"{'x checkpoint':>13} {'artifact MB':>12} {'tree RSS MB':>12} {'tree anon MB':>12}")
        conversions = [] if args.build and args.build_only else args.backends.split(",")
        for backend in conversions:
            for precision in args.precisions.split(","):
                out = Path(tmp) / f"{backend}-{precision}"
                limit = args.rss_limit_gb * 1000 if args.rss_limit_gb else None
                proc, sampled, stopped = watched(
                    [sys.executable, __file__, "--one", backend, precision, str(source),
                     str(out)], limit)
                ran = None
                if args.generate and proc.returncode == 0 and not stopped:
                    ran = watched([sys.executable, __file__, "--run", backend, precision,
                                   str(out), str(args.generate)], limit)
                shutil.rmtree(out, ignore_errors=True)  # a full-size artifact: free the disk
                if stopped:
                    print(f"{backend:<9} {precision:<9} STOPPED: its processes' anonymous "
                          f"memory passed {args.rss_limit_gb:g} GB ({sampled['anon'] / ckpt_mb:.2f}"
                          f" x checkpoint; RSS {sampled['rss']:.0f} MB)")
                    continue
                if proc.returncode != 0:
                    print(f"{backend:<9} {precision:<9} failed: "
                          f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{backend:<9} {precision:<9} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                      f"{r['peak_rss_mb'] / ckpt_mb:>13.2f} {r['size_mb']:>12.1f} "
                      f"{sampled['rss']:>12.0f} {sampled['anon']:>12.0f}")
                if ran is not None:
                    run_proc, run_peak, run_stopped = ran
                    if run_proc.returncode != 0 or run_stopped:
                        why = "STOPPED" if run_stopped else run_proc.stderr.strip().splitlines()[-1:]
                        print(f"{'':<19} run: failed: {why}")
                    else:
                        g = json.loads(run_proc.stdout.strip().splitlines()[-1])
                        print(f"{'':<19} run: loaded in {g['load_s']:.1f} s, {g['generated']} "
                              f"tokens at {g['tok_s']:.2f} tok/s, peak RSS "
                              f"{run_peak['rss']:.0f} MB (anon {run_peak['anon']:.0f} MB)")
        print("peak RSS: the largest single process (getrusage); tree RSS / anon: all of the "
              "conversion's processes together, sampled twice a second (anon: RSS less the "
              "resident pages of mapped files, which the kernel can drop)")
        if args.build:
            for backend in args.backends.split(","):
                build(args.build, backend, source, Path(tmp), ckpt_mb, args.rss_limit_gb,
                      args.cache or Path(tmp) / "phikit-cache")


def build(recipe: Path, backend: str, source: Path, tmp: Path, ckpt_mb: float,
          limit_gb: float | None, cache: Path) -> None:
    """`phikit build` of one backend's bundle, watched. The builds share one cache, so the
    reference is computed once (by the first build); the bundle and the cached conversion are
    removed after each (full-size artifacts: the disk)."""
    import os

    from shapes import TARGETS

    out = tmp / f"bundle-{backend}"
    cmd = [str(Path(sys.executable).parent / "phikit"), "build", str(recipe), "--source",
           str(source), "--target", TARGETS[backend], "--backend", backend, "--out", str(out)]
    os.environ["PHIKIT_CACHE"] = str(cache)  # a full-size conversion: not into the user's cache
    start = time.perf_counter()
    proc, peak, stopped = watched(cmd, limit_gb * 1000 if limit_gb else None)
    wall = time.perf_counter() - start
    verdict = "STOPPED" if stopped else {0: "pass", 1: "FAIL (a bound missed)"}.get(
        proc.returncode, f"error: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
    failed = out.with_name(out.name + ".failed")  # where phikit puts a bundle that failed
    report = next((d / "parity.json" for d in (out, failed) if (d / "parity.json").is_file()),
                  None)
    timing = json.loads(report.read_text()).get("timing", {}) if report else {}
    print(f"build {backend:<9} {verdict}: {wall:.0f} s (reference "
          f"{timing.get('reference_seconds', '-')} s, candidate "
          f"{timing.get('candidate_seconds', '-')} s), tree peak RSS {peak['rss']:.0f} MB "
          f"({peak['rss'] / ckpt_mb:.2f} x checkpoint), anon {peak['anon']:.0f} MB")
    for bundle in (out, failed):
        shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(cache / "artifacts", ignore_errors=True)


if __name__ == "__main__":
    main()
