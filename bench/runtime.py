"""Runtime speed of every CPU backend phikit builds, side by side with the peers and the hardware.

Engines (all from ONE random-weight checkpoint with Phi-3-mini's layer shapes, see shapes.py):
  phikit onnx / openvino / gguf, int4 and int8 - converted by phikit's own backends with the
      tiny-phi3 recipes (symmetric), each backend's block size for its target as the Phi-3
      recipes leave it (ONNX int4 on x86 CPUs: 128, otherwise 32; GGUF: Q4_0 / Q8_0), run through
      the runner code that ships in bundles, with each target's runtime options
  torch bf16      - transformers, the reference implementation (peer a)
  llama.cpp Q4_0 / Q8_0 - the same GGUF files through llama-cpp-python as its users call it, with
      its defaults (peer b)
  roofline        - weight bytes read per decoded token / memory bandwidth measured here with all
      cores (a reduction over 2 GB in torch): the speed limit of decode (peer c)

Each engine runs in a fresh process: cold start (load + first token of a 16-token prompt), prefill
latency (time to first token) for 128- and 1024-token prompts (each length once untimed first),
decode tokens/s over 64 tokens, peak RSS of that process, artifact size. Figures are ratios
measured in one run; not timed assertions.

Side by side means under the same conditions: the converted files are flushed to disk before any
measurement (the kernel's writeback of gigabytes would otherwise run during the first engines),
and the engines are measured in rounds, each round in a rotated order, each engine a fresh
process per round; a figure is the median over rounds. A VM's neighbours and clock drift then
touch every engine alike, not whichever ran first or last. The read bandwidth moves as much as
an engine does on a shared VM, so it is measured right before and right after every engine's
process, and that engine's roofline ratio in a round is its decode speed over the mean of the
two: a speed and the limit it is held to, read together. The ratio reported is the median of an
engine's rounds.

Usage: python bench/runtime.py [--layers 4] [--engines all|onnx-int4,...] [--rounds 3]
       [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shapes import make_checkpoint, shape_recipe, target_for  # noqa: E402

# engine -> (backend, recipe precision, quantization overrides) for phikit-built engines; each
# backend runs with the settings of its target in shapes.TARGETS
PHIKIT = {f"{b}-{p}": (b, p, {}) for b in ("onnx", "openvino", "gguf") for p in ("int4", "int8")}
# The ORT GenAI builder's own defaults (fp32 activations, lm_head over every prompt position),
# against phikit's CPU defaults (accuracy level 4, pruned lm_head) in onnx-int4
PHIKIT["onnx-int4-builder"] = ("onnx", "int4", {
    "accuracy_level": 0, "options": {"onnx": {"extra_options": {"prune_lm_head": "false"}}}})
PHIKIT["gguf-Q4_K_M"] = ("gguf", "int4", {"options": {"gguf": {"type": "Q4_K_M"}}})
# the int4 defaults with the other block size (ONNX on x86 CPUs: 128, OpenVINO: 32; see
# default_block_size): each runtime's kernels for the other block length, side by side
PHIKIT["onnx-int4-block32"] = ("onnx", "int4", {"block_size": 32})
PHIKIT["openvino-int4-block128"] = ("openvino", "int4", {"block_size": 128})
# The same artifact run with other runtime options (the host tables' choices, see
# runner/host.py): engine -> (engine whose artifact it runs, options over its target's)
VARIANTS = {
    # what the AMX protection costs: the Q4_0 repack off (ggml-org/llama.cpp#20824)
    "gguf-int4-no-extra-bufts": ("gguf-int4", {"extra_buffer_types": False}),
    "onnx-int4-no-spin": ("onnx-int4", {"allow_spinning": False}),
    "onnx-int4-spin": ("onnx-int4", {"allow_spinning": True}),
    "openvino-int4-dq0": ("openvino-int4", {"dynamic_quantization_group_size": 0}),
    "openvino-int4-kv-f16": ("openvino-int4", {"kv_cache_precision": "f16"}),
    "openvino-int4-kv-u8": ("openvino-int4", {"kv_cache_precision": "u8"}),
    "openvino-int8-dq0": ("openvino-int8", {"dynamic_quantization_group_size": 0}),
    # the plugin computes in bf16 by default where the CPU has AVX512-BF16 or AMX
    "openvino-int4-f32": ("openvino-int4", {"inference_precision": "f32"}),
    "openvino-int4-bf16": ("openvino-int4", {"inference_precision": "bf16"}),
    "openvino-int4-f32-dq0": ("openvino-int4", {"inference_precision": "f32",
                                                "dynamic_quantization_group_size": 0}),
    # decode on one core against all: near-linear scaling says the kernels, not memory, limit
    "onnx-int4-1-thread": ("onnx-int4", {"threads": 1}),
    "openvino-int4-1-thread": ("openvino-int4", {"threads": 1}),
    "gguf-int4-1-thread": ("gguf-int4", {"threads": 1}),
}
PEERS = ("torch-bf16", "llamacpp-Q4_0", "llamacpp-Q8_0")
PROMPTS = (128, 1024)
DECODE = 64


def convert(engine: str, source: Path, out: Path) -> Path:
    from toolkit.backends import BACKENDS

    backend, precision, overrides = PHIKIT[engine]
    BACKENDS[backend].convert(source, out, shape_recipe(backend, precision, overrides),
                              target_for(backend), log=lambda s: None)
    return out


# --- the child: one engine, fresh process --------------------------------------------------

class TorchSession:
    """transformers in bf16, greedy, with its KV cache: the shape of the phikit Session API."""

    def __init__(self, source: Path):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()

    def generate(self, ids, sampling):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([list(ids)]), use_cache=True)
            for _ in range(sampling.max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                yield token
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values,
                                 use_cache=True)


class LlamaCppPeer:
    """llama-cpp-python's high-level API with its defaults (threads: half the cores), save the
    extra buffer types, which follow phikit's choice for this CPU."""

    def __init__(self, gguf: Path):
        from toolkit.runner.llamacpp_rt import load_llama

        # n_ctx as phikit's runner; the extra buffer types as it chooses them for this CPU
        self.llm = load_llama(gguf, n_ctx=0, verbose=False)

    def generate(self, ids, sampling):
        for n, token in enumerate(self.llm.generate(list(ids), top_k=1, temp=0.0, reset=True)):
            yield int(token)
            if n + 1 >= sampling.max_new_tokens:
                return


def open_engine(engine: str, artifact: Path):
    from toolkit.backends import BACKENDS
    from toolkit.runner.core import open_session

    if engine == "torch-bf16":
        return TorchSession(artifact)
    if engine.startswith("llamacpp-"):
        return LlamaCppPeer(artifact / "model.gguf")
    base, runtime_overrides = VARIANTS.get(engine, (engine, {}))
    backend, precision, overrides = PHIKIT[base]
    options = {**BACKENDS[backend].runtime_options(target_for(backend),
                                                   shape_recipe(backend, precision, overrides)),
               **runtime_overrides}
    return open_session(BACKENDS[backend].runtime_module, artifact, options)


def first_token_seconds(session, ids) -> float:
    from toolkit.runner.core import Sampling

    start = time.perf_counter()
    next(iter(session.generate(ids, Sampling(max_new_tokens=1))))
    return time.perf_counter() - start


def child(engine: str, artifact: Path, repeats: int) -> dict:
    from toolkit.runner.core import Sampling

    prompts = iter(range(1, 1000))

    def prompt(n: int) -> list[int]:
        """A new prompt every call: runtimes that cache prompt prefixes (llama-cpp-python,
        OpenVINO GenAI's prefix cache) would otherwise time a cache hit, not a prefill."""
        k = next(prompts)
        return [1] + [1000 + (k * 7919 + j * 31) % 29000 for j in range(n - 1)]

    start = time.perf_counter()
    session = open_engine(engine, artifact)
    load = time.perf_counter() - start
    cold = load + first_token_seconds(session, prompt(16))
    result = {"load_s": load, "cold_first_token_s": cold}
    for n in PROMPTS:
        first_token_seconds(session, prompt(n))  # a length's first run allocates for its shapes
        result[f"prefill_{n}_ms"] = 1000 * statistics.median(
            first_token_seconds(session, prompt(n)) for _ in range(repeats))
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stamps = [time.perf_counter() for _ in session.generate(
            prompt(16), Sampling(max_new_tokens=DECODE, stop_token_ids=()))]
        cpu, wall = cpu + time.process_time() - cpu0, wall + time.perf_counter() - wall0
        if len(stamps) > 1:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result["decode_tok_s"] = statistics.median(rates) if rates else float("nan")
    # CPUs kept busy while decoding (threads that spin while they wait count here)
    result["decode_cpus_busy"] = cpu / wall if wall else float("nan")
    info = session.info() if hasattr(session, "info") else {}
    result["options_in_force"] = {k: v["value"] for k, v in
                                  info.get("options_in_force", {}).items()}
    # what decides the speed: what the runtime says it executes where it says so (OpenVINO's
    # compiled model names its precisions, also those it picked itself for this CPU), else the
    # options in force; and the thread count
    result["configuration"] = {**(info.get("executed_precision") or result["options_in_force"]),
                               "threads": VARIANTS.get(engine, ("", {}))[1].get("threads", "auto")}
    result["decoded"] = len(stamps)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec
    from the parent, which held the 2 GB bandwidth buffer)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the parent ------------------------------------------------------------------------------

class Bandwidth:
    """Read bandwidth with all cores: a sum over a 2 GB float32 tensor (best of 5), allocated
    once and measured beside every engine."""

    def __init__(self):
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.x = torch.ones(512 * 2**20, dtype=torch.float32)
        self.x.sum()

    def gb_s(self, threads: int | None = None) -> float:
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)
        best = min(_timed(self.x.sum) for _ in range(5))
        torch.set_num_threads(os.cpu_count() or 1)
        return self.x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def streamed_weight_bytes(engine: str, artifact: Path) -> int:
    """Bytes of weights a decoded token reads: every weight tensor except the embedding table
    (a token reads one row of it), read from each format's own metadata since each stores the
    embedding differently (ORT int4: fp32; OpenVINO: int8; GGUF Q4_0: q4_0 or q8_0...)."""
    def is_embedding(name: str) -> bool:
        return "embed_tokens" in name or name.startswith("token_embd")

    if engine == "torch-bf16":
        from safetensors import safe_open
        total = 0
        for f in artifact.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                total += sum(2 * math.prod(st.get_slice(k).get_shape()) for k in st.keys()
                             if not is_embedding(k))
        return total
    if engine.startswith(("gguf", "llamacpp")):
        from toolkit.backends.llama_cpp_source import converter_dir
        sys.path.insert(0, str(converter_dir() / "gguf-py"))
        from gguf import GGUFReader
        return sum(int(t.n_bytes) for t in GGUFReader(artifact / "model.gguf").tensors
                   if not is_embedding(t.name))
    if engine.startswith("onnx"):
        import onnx
        model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
        total = 0
        for init in model.graph.initializer:
            if is_embedding(init.name):
                continue
            ext = {e.key: e.value for e in init.external_data}
            total += int(ext["length"]) if "length" in ext else len(init.raw_data)
        return total
    if engine.startswith("openvino"):
        import openvino as ov
        model = ov.Core().read_model(str(artifact / "openvino_model.xml"))
        return sum(op.get_byte_size() for op in model.get_ops()
                   if op.get_type_name() == "Constant" and not is_embedding(op.get_friendly_name()))
    raise ValueError(engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--engines", default="all")
    ap.add_argument("--rounds", type=int, default=3,
                    help="every engine once per round, in a rotated order; figures: the median")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs within each process")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.repeats)))
        return
    engines = [*PHIKIT, *VARIANTS, *PEERS] if args.engines == "all" else args.engines.split(",")
    unknown = [e for e in engines if e not in (*PHIKIT, *VARIANTS, *PEERS)]
    if unknown:
        ap.error(f"unknown engines {', '.join(unknown)}; known: "
                 f"{', '.join([*PHIKIT, *VARIANTS, *PEERS])}")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        source = make_checkpoint(Path(tmp) / "ckpt", args.layers)
        artifacts = {"torch-bf16": source}
        for engine in engines:
            base = VARIANTS.get(engine, (engine,))[0]
            if base in PHIKIT and base not in artifacts:
                artifacts[base] = convert(base, source, Path(tmp) / base)
            if engine in VARIANTS:
                artifacts[engine] = artifacts[base]
        for bits, gguf in (("Q4_0", "gguf-int4"), ("Q8_0", "gguf-int8")):
            if f"llamacpp-{bits}" in engines:
                artifacts[f"llamacpp-{bits}"] = artifacts.get(gguf) or convert(
                    gguf, source, Path(tmp) / gguf)
        os.sync()  # the conversions' writeback, done before anything is timed
        samples: dict[str, list[dict] | None] = {engine: [] for engine in engines}
        meter = Bandwidth()
        bandwidths = [meter.gb_s()]  # before the first engine, then after every engine
        one_core = meter.gb_s(threads=1)  # what one core alone reads: is decode core-bound?
        for turn in range(args.rounds):
            shift = turn * len(engines) // args.rounds
            for engine in engines[shift:] + engines[:shift]:
                if samples[engine] is None:
                    continue  # failed in an earlier round
                proc = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats),
                                       "--child", engine, str(artifacts[engine])],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{engine}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                    samples[engine] = None
                    continue
                sample = json.loads(proc.stdout.strip().splitlines()[-1])
                bandwidths.append(meter.gb_s())
                sample["bandwidth_gb_s"] = (bandwidths[-2] + bandwidths[-1]) / 2
                samples[engine].append(sample)
        del meter
        bandwidth = statistics.median(bandwidths)
        for engine in engines:
            if not samples[engine]:
                continue
            row = median_row(samples[engine])
            row["size_mb"] = size_bytes(artifacts[engine]) / 1e6
            row["read_mb"] = streamed_weight_bytes(engine, artifacts[engine]) / 1e6
            row["roofline_tok_s"] = row["bandwidth_gb_s"] * 1e3 / row["read_mb"]
            row["decode_x_roofline"] = statistics.median(
                s["decode_tok_s"] * row["read_mb"] / (s["bandwidth_gb_s"] * 1e3)
                for s in samples[engine])
            row["rounds"] = samples[engine]
            rows[engine] = row
    report(rows, args, bandwidth, bandwidths, one_core)
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gb_s": bandwidth, "one_core_gb_s": one_core,
                                         "rows": rows}, indent=1))


def median_row(rounds: list[dict]) -> dict:
    """One engine's figures over its rounds: the median of each, the largest peak RSS."""
    row = dict(rounds[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            every = [r[key] for r in rounds]
            row[key] = max(every) if key == "peak_rss_mb" else statistics.median(every)
    return row


def report(rows: dict[str, dict], args, bandwidth: float, bandwidths: list[float],
           one_core: float) -> None:
    from toolkit.runner.host import host_cpu

    cpu = host_cpu()
    print(f"CPU: {cpu['model']} ({cpu['class']}; {', '.join(cpu['features']) or 'no flags of note'})")
    print(f"Phi-3-mini shapes x {args.layers} layers (random weights), {os.cpu_count()} cores, "
          f"read bandwidth {bandwidth:.1f} GB/s (the median of {len(bandwidths)}, measured "
          f"beside every engine; {min(bandwidths):.1f} - {max(bandwidths):.1f}; one core alone: "
          f"{one_core:.1f}); median of "
          f"{args.rounds} rounds (rotated order, a fresh process each) x {args.repeats} "
          f"run(s); decode after a "
          f"16-token prompt, {DECODE} tokens")
    cols = ("engine", "MB", "read MB/tok", "cold s", "pre128 ms", "pre1024 ms", "tok/s",
            "CPUs busy", "RSS MB", "GB/s beside", "GB/s decode",
            "tok/s x roof", "tok/s x torch", "tok/s x l.cpp", "pre128 x torch", "pre128 x l.cpp")
    print(" ".join(f"{c:>14}" if i else f"{c:<15}" for i, c in enumerate(cols)))
    torch_row = rows.get("torch-bf16", {})
    for engine, r in rows.items():
        peer = rows.get("llamacpp-Q8_0" if engine.endswith(("int8", "Q8_0")) else "llamacpp-Q4_0",
                        {})

        def ratio(key, other):
            return f"{r[key] / other[key]:.2f}" if other.get(key) else "-"

        cells = [f"{r['size_mb']:.0f}", f"{r['read_mb']:.0f}", f"{r['cold_first_token_s']:.2f}",
                 f"{r['prefill_128_ms']:.0f}", f"{r['prefill_1024_ms']:.0f}",
                 f"{r['decode_tok_s']:.1f}", f"{r.get('decode_cpus_busy', math.nan):.2f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['bandwidth_gb_s']:.1f}",
                 f"{r['decode_tok_s'] * r['read_mb'] / 1e3:.1f}",
                 f"{r['decode_x_roofline']:.2f}",
                 ratio("decode_tok_s", torch_row), ratio("decode_tok_s", peer),
                 ratio("prefill_128_ms", torch_row), ratio("prefill_128_ms", peer)]
        print(f"{engine:<15} " + " ".join(f"{c:>14}" for c in cells))
    print("CPUs busy: process CPU time / wall time while decoding (threads that spin count)")
    print("tok/s x roof: decode speed / (bandwidth / weight bytes per token), per round with "
          "the bandwidth measured beside that engine (GB/s beside: its median; GB/s decode: the "
          "weight bytes decode read per second); x torch, x l.cpp: "
          "ratio to PyTorch bf16 and to llama.cpp of the same bits (decode: higher is better; "
          "prefill: lower is better)")
    goals(rows)


# The goals every CPU target's default int4 bundle is held to (the performance issue): decode at
# DECODE_ROOFLINE_MIN of the memory limit and no slower than any other engine of the run; prefill
# no slower than the fastest engine of the run (PyTorch bf16 included).
DECODE_ROOFLINE_MIN = 0.85


def cpu_target_defaults() -> dict[str, str]:
    """target -> the engine of its default int4 bundle, for every target whose device is a CPU
    (an aarch64 one is stood in for by the same backend on this CPU, with the block size its
    bundle gets: onnx-int4-block32 for the Raspberry Pi)."""
    from toolkit.backends import BACKENDS
    from toolkit.paths import named_files
    from toolkit.schema import load_target

    out = {}
    for name, path in named_files("targets").items():
        target = load_target(path, set(BACKENDS))
        if target.device == "cpu" and "int4" in target.precisions:
            backend = BACKENDS[target.backend]
            block = backend.default_block_size("int4", target)
            built = backend.default_block_size("int4", target_for(target.backend))
            out[name] = f"{target.backend}-int4" + (f"-block{block}" if block != built else "")
    return out


def goals(rows: dict[str, dict]) -> list[dict]:
    """Print, per CPU target, its default's figures against the goals; return the rows."""
    results = []
    print("\ngoals per CPU target (its default int4 bundle; met / NOT MET)")
    print(f"{'target':<14} {'engine':<18} {'x roof':>7} {'best other decode':>24} "
          f"{'decode':>8} {'fastest prefill 128 / 1024':>34} {'prefill':>8}")
    for target, engine in cpu_target_defaults().items():
        r = rows.get(engine)
        if r is None:
            print(f"{target:<14} {engine:<18} not measured in this run")
            continue
        others = {e: o for e, o in rows.items() if not same_configuration(e, o, engine, r)}
        best = max(others, key=lambda e: others[e]["decode_tok_s"], default=None)
        roof = r["decode_x_roofline"]
        decode_met = roof >= DECODE_ROOFLINE_MIN and (
            best is None or r["decode_tok_s"] >= others[best]["decode_tok_s"])
        prefill = {}
        for n in PROMPTS:
            key = f"prefill_{n}_ms"
            fastest = min(others, key=lambda e: others[e][key], default=engine)
            prefill[n] = (fastest, r[key] / rows[fastest][key])
        prefill_met = all(ratio <= 1.0 for _, ratio in prefill.values())
        versus = (f"{best} {r['decode_tok_s'] / others[best]['decode_tok_s']:.2f}x"
                  if best else "-")
        fastest_text = " / ".join(f"{e} {x:.2f}x" for e, x in prefill.values())
        print(f"{target:<14} {engine:<18} {roof:>7.2f} {versus:>24} "
              f"{'met' if decode_met else 'NOT MET':>8} {fastest_text:>34} "
              f"{'met' if prefill_met else 'NOT MET':>8}")
        results.append({"target": target, "engine": engine, "decode_x_roofline": roof,
                        "decode_best_other": best, "decode_met": decode_met,
                        "prefill": prefill, "prefill_met": prefill_met})
    print(f"decode: >= {DECODE_ROOFLINE_MIN} x roofline and no slower than the best other engine; "
          "prefill: <= 1.0 x the fastest engine at 128 and at 1024 tokens (ratios: this "
          "engine / that one). Other engines: every row but the default itself and its variants "
          "that run the same executed configuration (the default in another process)")
    return results


def same_configuration(other: str, other_row: dict, engine: str, row: dict) -> bool:
    """Whether `other` is `engine` itself: the same artifact run in the same configuration (a
    variant whose override is what is in force anyway, e.g. spinning where ONNX Runtime spins
    by default, or bf16 where OpenVINO computes in bf16 by default). A variant with another
    configuration stays a rival: if it is faster, the host table chose wrong."""
    if other == engine:
        return True
    return (VARIANTS.get(other, (other,))[0] == engine
            and other_row.get("configuration") == row.get("configuration"))


if __name__ == "__main__":
    main()
