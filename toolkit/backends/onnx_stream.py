"""The ONNX Runtime GenAI builder, driven so that its memory does not grow with the model.

`python -m toolkit.backends.onnx_stream <the builder's arguments>` runs the builder's own
command line (onnxruntime_genai.models.builder) with two of its steps changed:

- **weights are mapped, not loaded**: `Model.load_weights` builds the transformers model on the
  meta device and gives every parameter the checkpoint's own tensor, memory-mapped from its
  safetensors shards (safetensors maps a tensor without reading it). The builder's graph
  refers to them lazily (its casts are `ir.LazyTensor`s), so a weight is read from the file
  when it is cast or quantized, and those pages belong to the file: the kernel can drop them.
  The builder's `from_pretrained` instead reads the whole checkpoint into process memory.
- **quantized one MatMul at a time**: `Model.to_nbits` serialises the whole float graph to one
  ModelProto (every weight cast to the I/O dtype, for the CPU fp32: twice the bf16 checkpoint)
  and hands it to ONNX Runtime's MatMulNBitsQuantizer. Here each weight goes to the same
  quantizer (DefaultWeightOnlyQuantizer, with the configuration MatMulNBitsQuantizer would make)
  alone, its float initializer is dropped as soon as its MatMulNBits node replaces it, and the
  checkpoint's pages it read are released from the process (they are read once).

Everything else - the graph, the quantization itself, genai_config.json, the tokenizer - is the
builder's own code. The streamed steps cover what phikit asks of the builder (a Hugging Face
safetensors checkpoint, the DEFAULT weight-only quantizer in QOperator format without
per-node overrides); any other case runs the builder's own steps. The same builder arguments
give the same ONNX graph and initializers either way (tests/test_onnx_stream.py).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def mapped_model(path: Path):
    """The transformers model of the checkpoint at `path`, made on the meta device, its
    parameters the shards' memory-mapped tensors. Buffers (rotary inv_freq) stay on the meta
    device: the builder computes its rotary caches from the config, and a read of one would
    fail loudly ("meta tensor"), not silently."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name in params:
                    _assign(model, name, f.get_tensor(name))
                    loaded.add(name)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {n for n, p in model.named_parameters(remove_duplicate=False)
                   if p.device.type != "meta"}
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: the safetensors shards lack {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def release_mapped_pages(files: set[str], libc) -> None:
    """Drop this process's resident pages of the mapped checkpoint files (Linux: madvise
    MADV_DONTNEED on their mappings; safetensors maps them private and writable, but nothing
    writes to them, so every page is clean and a later read maps it again from the file). A
    weight is read once, when it is quantized; without this its pages stay counted in the
    process's RSS until the kernel needs the memory."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        if libc is None or len(fields) < 6 or fields[5] not in files:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        libc.madvise(start, end - start, 4)  # MADV_DONTNEED


def _assign(model, name: str, tensor) -> None:
    import torch

    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param] = torch.nn.Parameter(tensor, requires_grad=False)


def _streamable_weights(builder, input_path: str) -> Path | None:
    path = Path(input_path)
    plain = builder.quant_type is None and "adapter_path" not in builder.extra_options
    return path if plain and path.is_dir() and any(path.glob("*.safetensors")) else None


def _streamable_quantization(builder) -> bool:
    return (getattr(builder, "quantization_algo", "default") == "default"
            and not getattr(builder, "int4_customized_weight_config", None)
            and not getattr(builder, "exact_quant_overrides", None)
            and not getattr(builder, "exact_quant_override_names", None)
            and not builder.quant_attrs["use_qdq"]
            and (builder.ep != "cuda" or builder.matmul_attrs.get("weights_prepacked", 0) <= 0))


def quantize_streamed(builder):
    """The builder's float graph with each weight of the op types to quantize replaced, one at
    a time, by what ONNX Runtime's DefaultWeightOnlyQuantizer makes of it."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    attrs = builder.quant_attrs
    config = DefaultWeightOnlyQuantConfig(
        block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
        accuracy_level=attrs["accuracy_level"], quant_format=QuantFormat.QOperator,
        op_types_to_quantize=attrs["op_types_to_quantize"], bits=attrs["bits"])
    quantizer = DefaultWeightOnlyQuantizer(config)
    model = builder.model
    graph = model.graph
    exclude = set(attrs["nodes_to_exclude"])
    shards = {str(p.resolve()) for p in Path(builder.model_name_or_path).glob("*.safetensors")}
    libc = _libc()
    for node in list(graph):
        if node.name in exclude or node.op_type not in config.op_types_to_quantize:
            continue
        weight = node.inputs[0 if node.op_type == "Gather" else 1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        scratch = onnx.GraphProto()  # the weight alone, where the quantizer looks for it
        scratch.initializer.append(ir.serde.serialize_tensor(weight.const_value))
        made = quantizer.quantize(ir.serde.serialize_node(node), [scratch])
        if len(made) == 1 and made[0].op_type == node.op_type:
            continue  # the quantizer skipped it (not a 2-D constant): it stays float
        if len(made) != 1 or list(made[0].output) != [v.name for v in node.outputs]:
            raise RuntimeError(f"{node.name}: the quantizer made {len(made)} nodes; only a "
                               "one-node replacement is streamed")
        values = {v.name: v for v in node.inputs if v is not None}
        for tensor in scratch.initializer:
            if tensor.name != weight.name:
                # copied out: a tensor read from the proto would keep the whole scratch graph,
                # the float weight too, alive (protobuf's arena)
                array = np.array(ir.serde.deserialize_tensor(tensor).numpy(), copy=True)
                value = ir.Value(name=tensor.name, const_value=ir.Tensor(array, name=tensor.name))
                value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
                graph.register_initializer(value)
                values[tensor.name] = value
        del scratch
        proto = made[0]
        new = ir.Node(proto.domain, proto.op_type, [values[name] for name in proto.input],
                      attributes=ir.convenience.convert_attributes(
                          {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}),
                      name=proto.name, num_outputs=1)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs,
                                                new.outputs)
        if not weight.uses():
            del graph.initializers[weight.name]  # the float weight, freed here
        release_mapped_pages(shards, libc)
    model.opset_imports.setdefault("com.microsoft", 1)
    return model


def main(argv: list[str]) -> None:
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's own modules on sys.path
    from builders.base import Model  # the module object builder.py itself imports

    load_weights, to_nbits = Model.load_weights, Model.to_nbits

    def streamed_load_weights(self, input_path):
        path = _streamable_weights(self, input_path)
        if path:
            try:
                model = mapped_model(path)
                print(f"[phikit] weights mapped from {path.name}'s safetensors, not loaded")
                return model
            except ValueError as e:  # names the model does not have: let transformers map them
                print(f"[phikit] weights not mapped ({e}); loading them as the builder does")
        return load_weights(self, input_path)

    def streamed_to_nbits(self):
        if not _streamable_quantization(self):
            return to_nbits(self)
        print("[phikit] quantizing one weight at a time")
        return quantize_streamed(self)

    Model.load_weights, Model.to_nbits = streamed_load_weights, streamed_to_nbits
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
