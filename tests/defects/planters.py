"""The defects: one function per defect per artifact format, and the registry that says which
function plants which defect into which backend's bundle (or why it cannot be planted).

Each planter changes ONE thing in an honest bundle's model directory, through that backend's own
file format (formats.py), and returns a line saying what it changed. Where a planter can check
that it found the right thing (the RoPE table really is theta's, the token really is in the
vocabulary) it does, so a format change shows up as an error here, not as a silent no-op that the
validator would then "miss".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .formats import (OnnxModel, OpenVinoIR, edit_json, gguf_reader, gguf_rewrite, gguf_scalar,
                      gguf_tensors, safetensors_names, safetensors_tensor, set_ir_rt_info)

from toolkit.backends import BACKENDS as REGISTRY

# What each defect touches (the same layer/tensor in every format, so the rows compare).
SWAPPED_LAYERS = (1, 2)
ZEROED_NORM_LAYER = 2  # its post-attention RMSNorm: the MLP of that layer sees zeros
SCALED_LAYER, SCALE = 1, 1.05  # the attention output projection
TWO_BIT_LAYER = 1
WRONG_THETA = 500_000.0  # Llama 3's base: a converter applying another family's default
WRONG_EOS = 32000  # config.json's single eos_token_id instead of generation_config's list:
#                    <|end|> (32007), where Phi-3 chat replies end, is no longer a stop token
DRIFT_FROM, DRIFT_STEP = 64, 10  # from position 64 on, one extra position every 10: RoPE drifts
SWAPPED_TOKENS = ("▁the", "▁to")  # among the most frequent tokens of evalsets/tiny-phi3.jsonl
END = "<|end|>"


@dataclass
class Ctx:
    model_dir: Path
    config: dict  # the source checkpoint's config.json (RoPE parameters, sizes)

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def rotary_dim(self) -> int:
        head = self.config.get("head_dim") or self.hidden // self.config["num_attention_heads"]
        return int(head * self.config.get("partial_rotary_factor", 1.0))

    @property
    def theta(self) -> float:
        return float(self.config.get("rope_theta")
                     or (self.config.get("rope_parameters") or {}).get("rope_theta"))

    @property
    def rope_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """LongRoPE's (short, long) per-frequency factors."""
        scaling = self.config["rope_scaling"]
        return (np.asarray(scaling["short_factor"], np.float64),
                np.asarray(scaling["long_factor"], np.float64))


# --- shared arithmetic --------------------------------------------------------------------------


def inv_freq(theta: float, dim: int, factors: np.ndarray | None = None) -> np.ndarray:
    """RoPE's inverse frequencies (LongRoPE divides them by its per-frequency factors)."""
    out = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return out / factors if factors is not None else out


def drifted(positions: np.ndarray) -> np.ndarray:
    """Positions as the rope_drift defect rotates them: exact before DRIFT_FROM, then ahead by
    one more position every DRIFT_STEP (relative distances past it stretched by 10%)."""
    return positions + np.maximum(positions - DRIFT_FROM, 0) // DRIFT_STEP


def two_bit_nibbles(packed: np.ndarray) -> np.ndarray:
    """4-bit codes (two per byte, offset 8 or two's complement) cut to 4 levels: keep each code's
    top two bits and put it in the middle of its bin, 0..15 -> {2, 6, 10, 14} (-6, -2, 2, 6 around
    the zero point): 2-bit weights on the same scales. Works per nibble, whatever the packing
    order, for uint8 and uint32 storage alike."""
    word = np.dtype(packed.dtype).itemsize
    high, mid = int.from_bytes(b"\xcc" * word, "little"), int.from_bytes(b"\x22" * word, "little")
    return (packed & packed.dtype.type(high)) | packed.dtype.type(mid)


def two_bit_fake_quant(w: np.ndarray, group: int = 32) -> np.ndarray:
    """float weights -> 4 levels per group of `group` inputs (min/max affine), as a 2-bit
    quantizer would store them."""
    g = w.astype(np.float64).reshape(*w.shape[:-1], w.shape[-1] // group, group)
    lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 3, 1.0)
    return (lo + np.round((g - lo) / step) * step).reshape(w.shape).astype(w.dtype)


def swap_arrays(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
    tmp = np.array(a)
    a[...] = b
    b[...] = tmp


def flush(*arrays) -> None:
    for a in arrays:
        if hasattr(a, "flush"):
            a.flush()


def to_two_bits(packed: list, floats: list, inputs_first: bool = False) -> None:
    """Rewrite packed int4 codes and float weights (in place, memory-mapped) at 2-bit levels;
    float weights are [out, in] unless `inputs_first` ([in, out], ONNX MatMul)."""
    for t in packed:
        t[...] = two_bit_nibbles(t)
        flush(t)
    for t in floats:
        w = np.asarray(t)
        t[...] = two_bit_fake_quant(w.T).T if inputs_first else two_bit_fake_quant(w)
        flush(t)


def drop_end(template: str) -> str:
    assert END in template, "the honest chat template has no <|end|>"
    return template.replace(END, "")


def swap_vocab_entries(tokenizer_json: Path) -> str:
    """Two entries of tokenizer.json's vocabulary exchange ids (merges and added tokens stay)."""
    a, b = SWAPPED_TOKENS

    def change(tok: dict) -> None:
        vocab = tok["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    edit_json(tokenizer_json, change)
    return f"tokenizer.json: ids of {a!r} and {b!r} exchanged"


def drop_end_from_template_files(model_dir: Path) -> str:
    """transformers and ORT GenAI read the template from chat_template.jinja (transformers 5 saves
    it there) or, where a bundle has it there, tokenizer_config.json's chat_template."""
    changed = []
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(drop_end(jinja.read_text(encoding="utf-8")), encoding="utf-8")
        changed.append(jinja.name)
    config = model_dir / "tokenizer_config.json"
    if "chat_template" in json.loads(config.read_text(encoding="utf-8")):
        edit_json(config, lambda c: c.update(chat_template=drop_end(c["chat_template"])))
        changed.append(config.name)
    assert changed, f"no chat template in {model_dir}"
    return f"{' and '.join(changed)}: {END} removed from the chat template"


def wrong_generation_eos(model_dir: Path) -> str:
    edit_json(model_dir / "generation_config.json", lambda c: c.update(eos_token_id=WRONG_EOS))
    return f"generation_config.json: eos_token_id {WRONG_EOS} (was Phi-3's list)"


# --- ONNX (ONNX Runtime GenAI) ------------------------------------------------------------------


def onnx_swap_layers(ctx: Ctx) -> str:
    m, (a, b) = OnnxModel(ctx.model_dir), SWAPPED_LAYERS
    names = m.names(rf"model\.layers\.{a}\..*")
    for name in names:
        ta, tb = m.tensor(name), m.tensor(name.replace(f"layers.{a}.", f"layers.{b}.", 1))
        swap_arrays(ta, tb)
        flush(ta, tb)
    return f"model.onnx.data: {len(names)} initializers of layers {a} and {b} exchanged"


def onnx_zero_norm(ctx: Ctx) -> str:
    name = f"model.layers.{ZEROED_NORM_LAYER}.post_attention_layernorm.weight"
    t = OnnxModel(ctx.model_dir).tensor(name)
    t[...] = 0
    flush(t)
    return f"model.onnx.data: {name} = 0"


def onnx_scale_projection(ctx: Ctx) -> str:
    name = f"model.layers.{SCALED_LAYER}.attn.o_proj.MatMul.weight"
    t = OnnxModel(ctx.model_dir).tensor(name)
    assert t.dtype.kind == "f", f"{name} is {t.dtype}: plant this into an fp32 bundle"
    t *= SCALE
    flush(t)
    return f"model.onnx.data: {name} x {SCALE}"


def onnx_two_bit_layer(ctx: Ctx) -> str:
    m = OnnxModel(ctx.model_dir)
    packed = m.names(rf"model\.layers\.{TWO_BIT_LAYER}\..*_Q4")  # MatMulNBits codes [N, blocks, 16]
    floats = m.names(rf"model\.layers\.{TWO_BIT_LAYER}\..*MatMul\.weight")  # [K, N]: inputs first
    to_two_bits([m.tensor(n) for n in packed], [m.tensor(n) for n in floats], inputs_first=True)
    assert packed or floats, "no layer weights found"
    return (f"model.onnx.data: {len(packed) + len(floats)} weights of layer {TWO_BIT_LAYER} cut "
            "to 4 levels per group of 32")


def onnx_rope_theta(ctx: Ctx) -> str:
    """The builder tabulates cos/sin(position * inv_freq) for every position: recompute both
    tables with another theta."""
    m = OnnxModel(ctx.model_dir)
    cos, sin = m.tensor("cos_cache"), m.tensor("sin_cache")
    pos = np.arange(cos.shape[0], dtype=np.float64)[:, None]
    dim = 2 * cos.shape[1]
    assert np.allclose(cos, np.cos(pos * inv_freq(ctx.theta, dim)), atol=2e-3), \
        "cos_cache is not the RoPE table of the checkpoint's theta"
    angles = pos * inv_freq(WRONG_THETA, dim)
    cos[...], sin[...] = np.cos(angles), np.sin(angles)
    flush(cos, sin)
    return f"model.onnx.data: cos_cache/sin_cache recomputed with theta {WRONG_THETA:g}"


def onnx_rope_drift(ctx: Ctx) -> str:
    """The cos/sin tables' rows from DRIFT_FROM on, recomputed at drifted positions."""
    m = OnnxModel(ctx.model_dir)
    cos, sin = m.tensor("cos_cache"), m.tensor("sin_cache")
    pos = np.arange(cos.shape[0], dtype=np.int64)
    freqs = inv_freq(ctx.theta, 2 * cos.shape[1])
    assert np.allclose(cos, np.cos(pos[:, None] * freqs), atol=2e-3), \
        "cos_cache is not the RoPE table of the checkpoint's theta"
    angles = drifted(pos)[:, None].astype(np.float64) * freqs
    cos[...], sin[...] = np.cos(angles), np.sin(angles)
    flush(cos, sin)
    return (f"model.onnx.data: cos_cache/sin_cache rows >= {DRIFT_FROM} at drifted positions "
            f"(+1 every {DRIFT_STEP})")


def onnx_long_factors_short(ctx: Ctx) -> str:
    """LongRoPE: the builder tabulates a second pair of cos/sin tables (all positions, long
    factors, times the attention factor) that an If node selects past the original length:
    recompute them with the short factors."""
    m = OnnxModel(ctx.model_dir)
    short, long = ctx.rope_factors
    for fn, name in ((np.cos, "cos_cache_large"), (np.sin, "sin_cache_large")):
        t = m.constant(name)
        table = m.array(t).astype(np.float64)
        pos = np.arange(table.shape[0], dtype=np.float64)[:, None]
        scale = m.array(m.constant("cos_cache_large"))[0, 0]  # cos(0) x the attention factor
        honest = scale * fn(pos * inv_freq(ctx.theta, 2 * table.shape[1], long))
        assert np.allclose(table, honest, atol=2e-3), f"{name} is not the long-factor table"
        m.set_array(t, scale * fn(pos * inv_freq(ctx.theta, 2 * table.shape[1], short)))
    m.save_graph()
    return "model.onnx: cos/sin_cache_large recomputed with the short factors"


def onnx_decode_position_off_by_one(ctx: Ctx) -> str:
    """Graph surgery: every GroupQueryAttention gets explicit rotary positions, past length +
    arange(sequence length), plus 1 when a single token is fed (decode). A prompt fed at once
    keeps positions 0..n-1; each generated token is rotated one position too far."""
    from onnx import TensorProto, helper

    m = OnnxModel(ctx.model_dir)
    graph = m.proto.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    total = gqa[0].input[6]  # total_sequence_length (int32 scalar)

    def const(name: str, value: int) -> None:
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [], [value]))

    p = "/defect/positions"
    const(f"{p}/zero", 0)
    const(f"{p}/one", 1)
    graph.initializer.append(helper.make_tensor(f"{p}/axes", TensorProto.INT64, [1], [0]))
    nodes = [
        helper.make_node("Shape", ["input_ids"], [f"{p}/shape"]),
        helper.make_node("Gather", [f"{p}/shape", f"{p}/one"], [f"{p}/seq"], axis=0),
        helper.make_node("Cast", [total], [f"{p}/total"], to=TensorProto.INT64),
        helper.make_node("Sub", [f"{p}/total", f"{p}/seq"], [f"{p}/past"]),
        helper.make_node("Range", [f"{p}/past", f"{p}/total", f"{p}/one"], [f"{p}/range"]),
        helper.make_node("Equal", [f"{p}/seq", f"{p}/one"], [f"{p}/decoding"]),
        helper.make_node("Cast", [f"{p}/decoding"], [f"{p}/bump"], to=TensorProto.INT64),
        helper.make_node("Add", [f"{p}/range", f"{p}/bump"], [f"{p}/shifted"]),
        helper.make_node("Unsqueeze", [f"{p}/shifted", f"{p}/axes"], [f"{p}/row"]),
        helper.make_node("Expand", [f"{p}/row", f"{p}/shape"], [f"{p}/position_ids"]),
    ]
    first = list(graph.node).index(gqa[0])
    for i, node in enumerate(nodes):
        graph.node.insert(first + i, node)
    for node in gqa:
        inputs = list(node.input) + [""] * (10 - len(node.input))
        inputs[9] = f"{p}/position_ids"  # GroupQueryAttention's optional position_ids input
        del node.input[:]
        node.input.extend(inputs)
    m.save_graph()
    return (f"model.onnx: {len(gqa)} GroupQueryAttention nodes get position_ids + "
            "(sequence_length == 1)")


def onnx_wrong_eos(ctx: Ctx) -> str:
    edit_json(ctx.model_dir / "genai_config.json",
              lambda c: c["model"].update(eos_token_id=WRONG_EOS))
    return f"genai_config.json: model.eos_token_id {WRONG_EOS} (was Phi-3's list)"


def onnx_template_without_end(ctx: Ctx) -> str:
    return drop_end_from_template_files(ctx.model_dir)


def onnx_swap_tokens(ctx: Ctx) -> str:
    return swap_vocab_entries(ctx.model_dir / "tokenizer.json")  # ORT GenAI's tokenizer reads it


# --- OpenVINO IR ------------------------------------------------------------------------------


def ov_layer_tensors(ir: OpenVinoIR, layer: int, hidden: int) -> dict[str, str]:
    """{role: constant name} for one decoder layer: its weights (named after the PyTorch
    parameters, with /scale and /zero_point beside compressed ones) and its two RMSNorm weights
    (anonymous constants, found through the layer that consumes them)."""
    prefix = f"self.model.layers.{layer}."
    out = {name[len(prefix):]: name for name in ir.consts if name.startswith(prefix)}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[norm] = ov_norm_weight(ir, layer, norm, hidden)
    return out


def ov_norm_weight(ir: OpenVinoIR, layer: int, norm: str, hidden: int) -> str:
    found = [c for c in ir.consumed_by(f"__module.model.layers.{layer}.{norm}/")
             if ir.tensor(c).size == hidden and ir.element_type(c) in ("f32", "f16")]
    assert len(found) == 1, f"layer {layer} {norm}: {found}"
    return found[0]


def ov_find_table(ir: OpenVinoIR, expected: np.ndarray) -> str:
    """The float constant holding exactly these values (RoPE tables have no stable names)."""
    found = [c for c in ir.consts if ir.element_type(c) in ("f32", "f16")
             and ir.tensor(c).size == expected.size
             and np.allclose(np.asarray(ir.tensor(c), np.float64).ravel(), expected, rtol=1e-3)]
    assert len(found) == 1, f"{len(found)} constants hold {expected[:3]}...: {found}"
    return found[0]


def ov_swap_layers(ctx: Ctx) -> str:
    ir, (a, b) = OpenVinoIR(ctx.model_dir), SWAPPED_LAYERS
    ta, tb = ov_layer_tensors(ir, a, ctx.hidden), ov_layer_tensors(ir, b, ctx.hidden)
    assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
    for role in ta:
        x, y = ir.tensor(ta[role]), ir.tensor(tb[role])
        swap_arrays(x, y)
        flush(x, y)
    return f"openvino_model.bin: {len(ta)} constants of layers {a} and {b} exchanged"


def ov_zero_norm(ctx: Ctx) -> str:
    ir = OpenVinoIR(ctx.model_dir)
    name = ov_norm_weight(ir, ZEROED_NORM_LAYER, "post_attention_layernorm", ctx.hidden)
    t = ir.tensor(name)
    t[...] = 0
    flush(t)
    return f"openvino_model.bin: layer {ZEROED_NORM_LAYER} post_attention_layernorm ({name}) = 0"


def ov_scale_projection(ctx: Ctx) -> str:
    ir = OpenVinoIR(ctx.model_dir)
    name = f"self.model.layers.{SCALED_LAYER}.self_attn.o_proj.weight"
    assert name in ir.consts, "no float o_proj weight: plant this into an fp32 bundle"
    t = ir.tensor(name)
    t *= SCALE
    flush(t)
    return f"openvino_model.bin: {name} x {SCALE}"


def ov_two_bit_layer(ctx: Ctx) -> str:
    ir = OpenVinoIR(ctx.model_dir)
    prefix = f"self.model.layers.{TWO_BIT_LAYER}."
    packed = [n for n in ir.consts if n.startswith(prefix) and ir.element_type(n) in ("i4", "u4")]
    floats = [n for n in ir.consts if n.startswith(prefix) and n.endswith("proj.weight")
              and ir.element_type(n) in ("f32", "f16")]  # [out, in]
    to_two_bits([ir.tensor(n) for n in packed], [ir.tensor(n) for n in floats])
    assert packed or floats, "no layer weights found"
    return (f"openvino_model.bin: {len(packed) + len(floats)} weights of layer {TWO_BIT_LAYER} "
            "cut to 4 levels per group of 32")


def ov_rope_theta(ctx: Ctx) -> str:
    """optimum's IR multiplies position_ids by an inv_freq constant: recompute it."""
    ir = OpenVinoIR(ctx.model_dir)
    name = ov_find_table(ir, inv_freq(ctx.theta, ctx.rotary_dim))
    t = ir.tensor(name)
    t[...] = inv_freq(WRONG_THETA, ctx.rotary_dim).reshape(t.shape)
    flush(t)
    return f"openvino_model.bin: inv_freq ({name}) recomputed with theta {WRONG_THETA:g}"


def ov_long_factors_short(ctx: Ctx) -> str:
    """optimum traces transformers' LongRoPE: both factor lists are constants of the IR, and the
    graph picks one by sequence length. Overwrite the long list with the short one."""
    ir = OpenVinoIR(ctx.model_dir)
    short, long = ctx.rope_factors
    short_name, long_name = ov_find_table(ir, short), ov_find_table(ir, long)
    t = ir.tensor(long_name)
    t[...] = ir.tensor(short_name)
    flush(t)
    return f"openvino_model.bin: long_factor ({long_name}) = short_factor ({short_name})"


def ov_replace_positions(ctx: Ctx, change: Callable, what: str) -> str:
    """Graph surgery through the openvino API: every consumer of position_ids reads
    change(position_ids) instead."""
    import openvino as ov

    xml = ctx.model_dir / "openvino_model.xml"
    model = ov.Core().read_model(xml)
    positions = model.input("position_ids")
    consumers = list(positions.get_target_inputs())
    changed = change(positions)
    for target in consumers:
        target.replace_source_output(changed.output(0))
    # read_model memory-maps the .bin: write beside it, then replace both files
    tmp = xml.with_name("defect.xml")
    ov.save_model(model, tmp, compress_to_fp16=False)
    del model
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)
    return f"openvino_model.xml: position_ids {what} ({len(consumers)} uses)"


def ov_rope_drift(ctx: Ctx) -> str:
    """position_ids + max(position_ids - DRIFT_FROM, 0) // DRIFT_STEP, in the graph."""
    import openvino.opset13 as ops

    def drift(positions):
        kind = positions.get_element_type().to_dtype()
        past = ops.maximum(ops.subtract(positions, ops.constant(kind.type(DRIFT_FROM))),
                           ops.constant(kind.type(0)))
        # integer Divide floors; `past` is never negative
        return ops.add(positions, ops.divide(past, ops.constant(kind.type(DRIFT_STEP))))

    return ov_replace_positions(ctx, drift, f"drifted from {DRIFT_FROM} on (+1 every "
                                             f"{DRIFT_STEP})")


def ov_decode_position_off_by_one(ctx: Ctx) -> str:
    """Graph surgery through the openvino API: position_ids + 1 whenever a single token is fed.
    The runner's teacher-forced pass feeds whole sequences (unchanged); openvino_genai feeds
    generated tokens one at a time (each one rotated a position too far)."""
    import openvino as ov
    import openvino.opset13 as ops

    def bump(positions):
        # one token fed <=> position_ids has one element ([1, 1]; openvino_genai's paged-attention
        # form of the model, which LLMPipeline uses on CPU, flattens it to [tokens])
        tokens = ops.reduce_prod(ops.shape_of(positions), ops.constant(np.int64(0)))
        one = ops.convert(ops.equal(tokens, ops.constant(np.int64(1))), ov.Type.i64)
        return ops.add(positions, ops.convert(one, positions.get_element_type()))

    return ov_replace_positions(ctx, bump, "+ (one token fed)")


def ov_wrong_eos(ctx: Ctx) -> str:
    return wrong_generation_eos(ctx.model_dir)  # openvino_genai's LLMPipeline reads it


def ov_template_without_end(ctx: Ctx) -> str:
    """openvino_genai renders the chat template stored in the tokenizer IR's rt_info."""
    set_ir_rt_info(ctx.model_dir / "openvino_tokenizer.xml", "chat_template", drop_end)
    return f"openvino_tokenizer.xml rt_info chat_template: {END} removed"


def ov_swap_tokens(ctx: Ctx) -> str:
    """Swap the entries in tokenizer.json, then convert the tokenizer again with
    openvino_tokenizers through optimum-intel's own export_tokenizer (the function the conversion
    used: on the honest tokenizer.json it writes byte-identical .bin files)."""
    from optimum.exporters.openvino.convert import export_tokenizer
    from transformers import AutoTokenizer

    line = swap_vocab_entries(ctx.model_dir / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.model_dir))
    export_tokenizer(tokenizer, ctx.model_dir, task="text-generation-with-past")
    return line + "; openvino_tokenizer/detokenizer re-converted from it"


# --- MLX (safetensors + config.json) ----------------------------------------------------------


def mlx_weights(ctx: Ctx) -> Path:
    (path,) = ctx.model_dir.glob("*.safetensors")
    return path


def mlx_swap_layers(ctx: Ctx) -> str:
    path, (a, b) = mlx_weights(ctx), SWAPPED_LAYERS
    names = [n for n in safetensors_names(path) if n.startswith(f"model.layers.{a}.")]
    for name in names:
        ta = safetensors_tensor(path, name)
        tb = safetensors_tensor(path, name.replace(f"layers.{a}.", f"layers.{b}.", 1))
        swap_arrays(ta, tb)
        flush(ta, tb)
    return f"{path.name}: {len(names)} tensors of layers {a} and {b} exchanged"


def mlx_zero_norm(ctx: Ctx) -> str:
    name = f"model.layers.{ZEROED_NORM_LAYER}.post_attention_layernorm.weight"
    t = safetensors_tensor(mlx_weights(ctx), name)
    t[...] = 0
    flush(t)
    return f"model.safetensors: {name} = 0"


def mlx_scale_projection(ctx: Ctx) -> str:
    name = f"model.layers.{SCALED_LAYER}.self_attn.o_proj.weight"
    t = safetensors_tensor(mlx_weights(ctx), name)
    assert t.dtype.kind == "f", f"{name} is {t.dtype}: plant this into an fp32 bundle"
    t *= SCALE
    flush(t)
    return f"model.safetensors: {name} x {SCALE}"


def mlx_two_bit_layer(ctx: Ctx) -> str:
    """Float weights fake-quantized; a 4-bit bundle's packed uint32 codes cut like the others'."""
    path = mlx_weights(ctx)
    names = [n for n in safetensors_names(path)
             if n.startswith(f"model.layers.{TWO_BIT_LAYER}.") and n.endswith("proj.weight")]
    for name in names:
        t = safetensors_tensor(path, name)
        t[...] = two_bit_nibbles(t) if t.dtype == np.uint32 else two_bit_fake_quant(np.asarray(t))
        flush(t)
    return f"{path.name}: {len(names)} weights of layer {TWO_BIT_LAYER} cut to 4 levels per group"


def mlx_rope_theta(ctx: Ctx) -> str:
    edit_json(ctx.model_dir / "config.json", lambda c: c.update(rope_theta=WRONG_THETA))
    return f"config.json: rope_theta {WRONG_THETA:g}"


def mlx_long_factors_short(ctx: Ctx) -> str:
    def change(c: dict) -> None:
        c["rope_scaling"]["long_factor"] = list(c["rope_scaling"]["short_factor"])

    edit_json(ctx.model_dir / "config.json", change)
    return "config.json: rope_scaling.long_factor = short_factor"


def mlx_wrong_eos(ctx: Ctx) -> str:
    return wrong_generation_eos(ctx.model_dir)  # the runner's generation_eos() reads it first


def mlx_template_without_end(ctx: Ctx) -> str:
    return drop_end_from_template_files(ctx.model_dir)


def mlx_swap_tokens(ctx: Ctx) -> str:
    return swap_vocab_entries(ctx.model_dir / "tokenizer.json")


# --- GGUF (llama.cpp) -----------------------------------------------------------------------


def gguf_swap_layers(ctx: Ctx) -> str:
    reader, (a, b) = gguf_reader(ctx.model_dir), SWAPPED_LAYERS
    ta, tb = gguf_tensors(reader, rf"blk\.{a}\..*"), gguf_tensors(reader, rf"blk\.{b}\..*")
    for name, t in ta.items():
        swap_arrays(t.data, tb[name.replace(f"blk.{a}.", f"blk.{b}.", 1)].data)
    flush(reader.data)
    return f"model.gguf: {len(ta)} tensors of blk.{a} and blk.{b} exchanged"


def gguf_zero_norm(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    name = f"blk.{ZEROED_NORM_LAYER}.ffn_norm.weight"  # llama.cpp's post_attention_layernorm
    gguf_tensors(reader, name)[name].data[...] = 0
    flush(reader.data)
    return f"model.gguf: {name} = 0"


def gguf_scale_projection(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    name = f"blk.{SCALED_LAYER}.attn_output.weight"
    t = gguf_tensors(reader, name)[name]
    assert t.tensor_type.name == "F32", f"{name} is {t.tensor_type.name}: plant into fp32"
    t.data[...] *= SCALE
    flush(reader.data)
    return f"model.gguf: {name} x {SCALE}"


def gguf_two_bit_layer(ctx: Ctx) -> str:
    """Q4_0 blocks are an fp16 scale + 16 bytes of 4-bit codes (offset 8): cut the codes; F32
    matrices ([out, in] in numpy's order) fake-quantized."""
    reader = gguf_reader(ctx.model_dir)
    weights = [t for t in gguf_tensors(reader, rf"blk\.{TWO_BIT_LAYER}\..*").values()
               if len(t.data.shape) == 2 and t.tensor_type.name in ("Q4_0", "F32")]
    assert weights, "no Q4_0 or F32 matrices"
    for t in weights:
        if t.tensor_type.name == "Q4_0":
            blocks = t.data.reshape(-1, 18)
            blocks[:, 2:] = two_bit_nibbles(blocks[:, 2:])
        else:
            t.data[...] = two_bit_fake_quant(np.asarray(t.data))
    flush(reader.data)
    return f"model.gguf: {len(weights)} matrices of blk.{TWO_BIT_LAYER} cut to 4 levels per group"


def gguf_rope_theta(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    value = gguf_scalar(reader, "phi3.rope.freq_base")
    assert value[0] == ctx.theta, value
    value[0] = WRONG_THETA
    flush(reader.data)
    return f"model.gguf: phi3.rope.freq_base {WRONG_THETA:g}"


def gguf_long_factors_short(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    factors = gguf_tensors(reader, r"rope_factors_(long|short)\.weight")
    assert len(factors) == 2, f"no LongRoPE factor tensors: {sorted(factors)}"
    factors["rope_factors_long.weight"].data[...] = factors["rope_factors_short.weight"].data
    flush(reader.data)
    return "model.gguf: rope_factors_long = rope_factors_short"


def gguf_wrong_eos(ctx: Ctx) -> str:
    # the runner stops at generation_config.json's ids when the file is there (it is, in every
    # phikit GGUF bundle); llama.cpp's own end-of-generation set only without it
    return wrong_generation_eos(ctx.model_dir)


def gguf_template_without_end(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir, "r")
    template = reader.fields["tokenizer.chat_template"].contents()
    del reader
    gguf_rewrite(ctx.model_dir, {"tokenizer.chat_template": drop_end(template)})
    return f"model.gguf: tokenizer.chat_template without {END}"


def gguf_swap_tokens(ctx: Ctx) -> str:
    """tokenizer.ggml.tokens, with their scores and types: two ids exchange their pieces."""
    reader = gguf_reader(ctx.model_dir, "r")
    arrays = {k: list(reader.fields[k].contents()) for k in
              ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    del reader
    tokens = arrays["tokenizer.ggml.tokens"]
    i, j = (tokens.index(t) for t in SWAPPED_TOKENS)
    for values in arrays.values():
        values[i], values[j] = values[j], values[i]
    gguf_rewrite(ctx.model_dir, arrays)
    return f"model.gguf: tokenizer.ggml tokens {i} and {j} ({SWAPPED_TOKENS}) exchanged"


# --- registry -----------------------------------------------------------------------------------

WEIGHT_METRICS = ("kld_mean", "kld_p99", "top1", "ppl_ratio")


@dataclass(frozen=True)
class Defect:
    name: str
    description: str
    expect: tuple[str, ...]  # at least one of these checks must fail
    keep: tuple[str, ...] = ()  # these checks must still pass: the defect is local to a symptom
    precision: str = "int4"  # host bundle
    family: str = "tiny-phi3"
    # backend -> another host precision. MLX's rows go into its fp32 bundle (the table has
    # always shown that host for it) unless a defect says otherwise.
    hosts: tuple[tuple[str, str], ...] = (("mlx", "fp32"),)


@dataclass(frozen=True)
class NotPlantable:
    reason: str


DEFECTS = {d.name: d for d in [
    Defect("swap_layers", f"decoder layers {SWAPPED_LAYERS[0]} and {SWAPPED_LAYERS[1]} swapped",
           WEIGHT_METRICS),
    # fp32 host: zeroing this norm silences layer 2's MLP, which the 4-layer fixture barely
    # needs (the int4 row: zero_norm_int4)
    Defect("zero_norm", f"layer {ZEROED_NORM_LAYER} post-attention RMSNorm weight zeroed",
           WEIGHT_METRICS, precision="fp32"),
    # The same two defects in int4 bundles, every backend's: int4's own error hid them under the
    # one 0.02 bound all backends shared; each backend's measured default bound (2x its honest
    # KLD) sees them
    Defect("zero_norm_int4", f"layer {ZEROED_NORM_LAYER} post-attention RMSNorm weight zeroed, "
           "int4 bundle", WEIGHT_METRICS, hosts=()),
    Defect("scale_projection", f"layer {SCALED_LAYER} o_proj x {SCALE} (fp32 bundle: tight bounds)",
           WEIGHT_METRICS, precision="fp32"),
    # fp32 host; the int4 row is two_bit_layer_int4 (the planters cut packed 4-bit codes too)
    Defect("two_bit_layer", f"layer {TWO_BIT_LAYER} weights at 2 bits (4 levels per group)",
           WEIGHT_METRICS, precision="fp32"),
    Defect("two_bit_layer_int4", f"layer {TWO_BIT_LAYER} weights at 2 bits, int4 bundle",
           WEIGHT_METRICS, hosts=()),
    Defect("rope_theta", f"RoPE theta {WRONG_THETA:g} instead of the checkpoint's",
           WEIGHT_METRICS),
    # fp32 host. transformers applies the long factors to EVERY position of a sequence longer
    # than the original length, so early positions of long texts change too, by less (fp32:
    # KLD 0.021 before position 64, 0.035 past it): at fp32 bounds both bands fail. The int4
    # rows are long_factors_short_int4 / long_factors_off_int4 (claim_planters.py), under the
    # recipe's bounds measured per backend (they were a hand-set 0.03, 4.5-10x honest KLD).
    Defect("long_factors_short", "LongRoPE long factors replaced by the short ones",
           ("kld_mean[past_original]",), precision="fp32", family="tiny-phi3-longrope"),
    # int4 host: quantization drift already ends greedy agreement with the reference after ~6
    # tokens there, so greedy_match_mean cannot see it (fp32 bundles: 9.3 vs bound 20, caught);
    # decode_agreement compares the runtime's generation with its own teacher-forced pass
    Defect("decode_position_off_by_one", "decode path only: position ids +1 per generated token",
           ("decode_agreement", "greedy_match_mean"), keep=("kld_mean", "top1")),
    # int4 host. KLD past position 64 measured 3.6x (ONNX) and 8.8x (OpenVINO) that before it;
    # on ONNX every other check passes (KLD mean 0.0096, bound 0.0128), OpenVINO's tighter
    # mean bound (0.0043) sees it too
    Defect("rope_drift", f"RoPE positions drift from {DRIFT_FROM} on (+1 every {DRIFT_STEP})",
           ("kld_drift",)),
    Defect("wrong_eos", f"EOS ids = [{WRONG_EOS}] (<|end|> not a stop token)",
           ("eos_agreement",)),
    Defect("template_without_end", "chat template without <|end|>", ("token_agreement",)),
    Defect("swap_tokens", f"vocabulary entries {SWAPPED_TOKENS[0]!r} / {SWAPPED_TOKENS[1]!r} "
           "swapped", ("token_agreement",)),
]}

RUNTIME_POSITIONS = ("positions are not stored in the artifact: {runtime} computes them in its "
                     "own code from the KV-cache length; the only way to plant this would be to "
                     "patch the runtime, which is not an artifact defect")

# Written planters (and the reasons a defect cannot be planted into a format); a registered
# backend with none is still enumerated, its cells saying that no planter exists yet.
WRITTEN: dict[tuple[str, str], Callable[[Ctx], str] | NotPlantable] = {
    ("swap_layers", "onnx"): onnx_swap_layers,
    ("swap_layers", "openvino"): ov_swap_layers,
    ("swap_layers", "mlx"): mlx_swap_layers,
    ("swap_layers", "gguf"): gguf_swap_layers,
    ("zero_norm", "onnx"): onnx_zero_norm,
    ("zero_norm", "openvino"): ov_zero_norm,
    ("zero_norm", "mlx"): mlx_zero_norm,
    ("zero_norm", "gguf"): gguf_zero_norm,
    ("scale_projection", "onnx"): onnx_scale_projection,
    ("scale_projection", "openvino"): ov_scale_projection,
    ("scale_projection", "mlx"): mlx_scale_projection,
    ("scale_projection", "gguf"): gguf_scale_projection,
    ("two_bit_layer", "onnx"): onnx_two_bit_layer,
    ("two_bit_layer", "openvino"): ov_two_bit_layer,
    ("two_bit_layer", "mlx"): mlx_two_bit_layer,
    ("two_bit_layer", "gguf"): gguf_two_bit_layer,
    ("rope_theta", "onnx"): onnx_rope_theta,
    ("rope_theta", "openvino"): ov_rope_theta,
    ("rope_theta", "mlx"): mlx_rope_theta,
    ("rope_theta", "gguf"): gguf_rope_theta,
    ("long_factors_short", "onnx"): onnx_long_factors_short,
    ("long_factors_short", "openvino"): ov_long_factors_short,
    ("long_factors_short", "mlx"): mlx_long_factors_short,
    ("long_factors_short", "gguf"): gguf_long_factors_short,
    ("decode_position_off_by_one", "onnx"): onnx_decode_position_off_by_one,
    ("decode_position_off_by_one", "openvino"): ov_decode_position_off_by_one,
    ("decode_position_off_by_one", "mlx"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="mlx-lm (its attention modules' RoPE offset = cache.offset)")),
    ("decode_position_off_by_one", "gguf"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="llama.cpp (the batch's pos[] from n_past)")),
    ("rope_drift", "onnx"): onnx_rope_drift,
    ("rope_drift", "openvino"): ov_rope_drift,
    ("rope_drift", "mlx"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="mlx-lm (its attention modules' RoPE offset = cache.offset)")),
    ("rope_drift", "gguf"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="llama.cpp (the batch's pos[] from n_past)")),
    ("wrong_eos", "onnx"): onnx_wrong_eos,
    ("wrong_eos", "openvino"): ov_wrong_eos,
    ("wrong_eos", "mlx"): mlx_wrong_eos,
    ("wrong_eos", "gguf"): gguf_wrong_eos,
    ("template_without_end", "onnx"): onnx_template_without_end,
    ("template_without_end", "openvino"): ov_template_without_end,
    ("template_without_end", "mlx"): mlx_template_without_end,
    ("template_without_end", "gguf"): gguf_template_without_end,
    ("swap_tokens", "onnx"): onnx_swap_tokens,
    ("swap_tokens", "openvino"): ov_swap_tokens,
    ("swap_tokens", "mlx"): mlx_swap_tokens,
    ("swap_tokens", "gguf"): gguf_swap_tokens,
}


# the int4 rows plant with the same functions as their fp32 rows
WRITTEN.update({(f"{d}_int4", b): planter for (d, b), planter in list(WRITTEN.items())
                if d in ("zero_norm", "two_bit_layer")})


# what the bundle claims (context, EOS, templates, the Modelfile): claim_planters.py
from .claim_planters import CLAIM_DEFECTS, CLAIM_WRITTEN  # noqa: E402

DEFECTS.update({d.name: d for d in CLAIM_DEFECTS})
WRITTEN.update(CLAIM_WRITTEN)


def cells(registry=None) -> dict[tuple[str, str], Callable[[Ctx], str] | NotPlantable]:
    """Every defect x every registered backend: its planter, or why there is none."""
    names = sorted(REGISTRY if registry is None else registry)
    return {(d, b): WRITTEN.get((d, b)) or NotPlantable(
                f"no planter for the {b} backend's artifact format yet "
                "(tests/defects/planters.py): this defect is not tested there")
            for d in DEFECTS for b in names}


PLANTERS = cells()

def host(defect: Defect, backend: str) -> tuple[str, str]:
    """(model family, precision) of the honest bundle this defect is planted into."""
    return defect.family, dict(defect.hosts).get(backend, defect.precision)
