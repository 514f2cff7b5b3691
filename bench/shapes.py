"""Random-weight checkpoints with the real Phi-3-mini (or Phi-3-medium) layer shapes, for the
benchmarks.

mini: hidden 3072, intermediate 8192, 32 heads (32 KV heads), vocab 32064, N layers; medium:
hidden 5120, intermediate 17920, 40 heads (10 KV heads); bf16 safetensors
(sharded at 2 GB, like the published ones) with the embedded tiny-phi3's tokenizer files. Random weights are fine for speed and memory; they
say nothing about accuracy (the embedded trained fixture is for that).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-phi3"
# The target whose settings (threads, provider, options) each backend is benchmarked with.
TARGETS = {"onnx": "generic-cpu", "openvino": "intel-cpu", "mlx": "apple-metal", "gguf": "ollama"}
# The published checkpoints' layer shapes (their config.json): mini 3.8B at 32 layers, medium
# 14B at 40 layers (grouped-query attention, 10 KV heads)
SHAPES = {
    "mini": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064),
    "medium": dict(hidden_size=5120, intermediate_size=17920, num_attention_heads=40,
                   num_key_value_heads=10, vocab_size=32064),
}
LAYERS = {"mini": 32, "medium": 40}


def make_checkpoint(out: Path, layers: int, shard_bytes: int = 2 << 30,
                    shape: str = "mini") -> Path:
    """Write the checkpoint tensor by tensor (never a whole model in memory, so the 32-layer,
    7.6 GB one is made in a few GB), sharded like the published checkpoints, bf16 like them."""
    import torch
    from safetensors.torch import save_file

    dims = SHAPES[shape]
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    config = json.loads((TINY / "config.json").read_text())
    config.update(dims, num_hidden_layers=layers, torch_dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (v, h)
        for n in range(layers):
            pre = f"model.layers.{n}."
            yield pre + "input_layernorm.weight", (h,)
            yield pre + "self_attn.qkv_proj.weight", (h + 2 * kv, h)
            yield pre + "self_attn.o_proj.weight", (h, h)
            yield pre + "post_attention_layernorm.weight", (h,)
            yield pre + "mlp.gate_up_proj.weight", (2 * i, h)
            yield pre + "mlp.down_proj.weight", (h, i)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (v, h)

    # plan the shards from the shapes, then make and save one shard at a time
    plan: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensors():
        nbytes = 2 * math.prod(shape)
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for n, entries in enumerate(plan, 1):
        file = (f"model-{n:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1
                else "model.safetensors")
        shard = {name: (torch.ones(shape) if len(shape) == 1 else
                        torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                 for name, shape in entries}
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * 2 for t in shard.values())
        del shard
    if len(plan) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy2(TINY / name, out / name)
    return out


def target_for(backend: str):
    """The loaded Target that `backend` is benchmarked with (TARGETS)."""
    from toolkit.backends import BACKENDS
    from toolkit.build import find_target
    from toolkit.schema import load_target

    return load_target(find_target(TARGETS[backend]), set(BACKENDS))


def shape_recipe(backend: str, precision: str, overrides: dict | None = None):
    """The tiny-phi3 recipe of `precision` as the Phi-3 recipes quantize: block size left to the
    backend's default for its benchmark target (unless `overrides` names one), then resolved as
    `phikit build` resolves it. Quantization overrides apply on top."""
    from toolkit.backends import BACKENDS
    from toolkit.backends.common import with_block_size
    from toolkit.schema import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"tiny-phi3-{precision}.yaml")
    quant = recipe.quantization.model_copy(update={"block_size": None, **(overrides or {})})
    return with_block_size(recipe.model_copy(update={"quantization": quant}), BACKENDS[backend],
                           target_for(backend))


@dataclass
class ShapeArtifact:
    """One backend's int4 artifact of a Phi-3-mini-shape checkpoint, as a benchmark times it."""
    name: str
    backend: object  # toolkit.backends.Backend
    target: object   # toolkit.schema.Target
    recipe: object   # toolkit.schema.Recipe
    out: Path
    options: dict    # the target's runtime options, at the benchmark's thread count


def shape_artifacts(layers: int, backends: list[str], threads: int) -> Iterator[ShapeArtifact]:
    """Each backend's conversion of one random Phi-3-mini-shape checkpoint of `layers` layers, in
    a directory removed afterwards; the conversion's writeback is flushed before it is yielded,
    so none of it lands in what is timed."""
    from toolkit.backends import BACKENDS
    from toolkit.schema import load_recipe

    with tempfile.TemporaryDirectory(prefix="phikit-bench-") as tmp:
        source = make_checkpoint(Path(tmp) / "ckpt", layers)
        recipe = load_recipe(REPO / "recipes" / "tiny-phi3-int4.yaml")
        for name in backends:
            backend, target = BACKENDS[name], target_for(name)
            out = Path(tmp) / name
            backend.convert(source, out, recipe, target, log=lambda s: None)
            os.sync()
            yield ShapeArtifact(name, backend, target, recipe, out,
                                {**backend.runtime_options(target, recipe), "threads": threads})
