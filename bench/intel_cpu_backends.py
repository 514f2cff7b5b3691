"""Which backend should the intel-cpu target default to? ONNX Runtime GenAI vs OpenVINO, side by side.

Both are built by phikit's own backends from the same random checkpoint with the real Phi-3-mini
layer shapes (hidden 3072, intermediate 8192, 32 heads, vocab 32064; N layers), with the same
recipe (int4, block 32, symmetric), and run through the same runner code that ships in bundles.
Figures are printed as ratios measured in one run; nothing here is a timed assertion.

Usage: python bench/intel_cpu_backends.py [--layers 2] [--precision int4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolkit.backends import BACKENDS  # noqa: E402
from toolkit.build import find_target  # noqa: E402
from toolkit.runner.core import Sampling, open_session  # noqa: E402
from toolkit.schema import load_recipe, load_target  # noqa: E402


def make_checkpoint(out: Path, layers: int) -> Path:
    """Random weights, Phi-3-mini shapes, the embedded model's tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    tiny = REPO / "models" / "tiny-phi3"
    config = json.loads((tiny / "config.json").read_text())
    config.update(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                  num_key_value_heads=32, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**{k: v for k, v in config.items() if k not in (
        "architectures", "torch_dtype", "transformers_version")}))
    out.mkdir(parents=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy2(tiny / name, out / name)
    return out


def measure(session, repeats: int) -> dict[str, float]:
    prompt = list(range(1000, 1128))  # 128 tokens
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        session.logits(prompt)
        prefill.append(time.perf_counter() - start)
        stamps = []
        start = time.perf_counter()
        for _ in session.generate(prompt[:16], Sampling(max_new_tokens=64)):
            stamps.append(time.perf_counter())
        if len(stamps) > 1:
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"prefill_128_ms": 1000 * statistics.median(prefill),
            "decode_tok_s": statistics.median(decode) if decode else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--precision", default="int4", choices=["int4", "int8"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    recipe = load_recipe(REPO / "recipes" / f"tiny-phi3-{args.precision}.yaml")
    target = load_target(find_target("intel-cpu"), set(BACKENDS))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        source = make_checkpoint(Path(tmp) / "ckpt", args.layers)
        for name in target.allowed_backends():
            backend = BACKENDS[name]
            out = Path(tmp) / name
            start = time.perf_counter()
            backend.convert(source, out, recipe, target, log=lambda s: None)
            convert_s = time.perf_counter() - start
            session = open_session(backend.runtime_module, out,
                                   backend.runtime_options(target, recipe))
            rows[name] = {"convert_s": convert_s, **measure(session, args.repeats)}
            del session
    base = rows["openvino"]
    print(f"intel-cpu, {args.precision} (block 32, sym), Phi-3-mini shapes x {args.layers} "
          f"layers, 128-token prefill, 64 decoded tokens, median of {args.repeats}")
    for r in rows.values():  # one chat turn: read 128 tokens, answer 64
        r["turn_s"] = r["prefill_128_ms"] / 1000 + 64 / r["decode_tok_s"]
    print(f"{'backend':<10} {'prefill ms':>11} {'decode tok/s':>13} {'turn s':>7} "
          f"{'convert s':>10} {'prefill x OV':>13} {'decode x OV':>12} {'turn x OV':>10}")
    for name, r in rows.items():
        print(f"{name:<10} {r['prefill_128_ms']:>11.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['turn_s']:>7.2f} {r['convert_s']:>10.1f} "
              f"{r['prefill_128_ms'] / base['prefill_128_ms']:>13.2f} "
              f"{r['decode_tok_s'] / base['decode_tok_s']:>12.2f} "
              f"{r['turn_s'] / base['turn_s']:>10.2f}")
    fastest = min(rows, key=lambda n: rows[n]["turn_s"])
    print(f"faster for a 128-token prompt + 64-token answer: {fastest}")


if __name__ == "__main__":
    main()
