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

from ..mapped_weights import PageReleaser, mapped_model, shard_files


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
    pages = PageReleaser(shard_files(builder.model_name_or_path))  # each weight is read once
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
        pages.release()
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
