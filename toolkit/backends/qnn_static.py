"""Olive's StaticLLM output -> the fixed-shape graphs the HTP compiles, + qnn_pipeline.json.

StaticLLM fixes the prefill chunk but leaves the batch, the KV-cache length
(`past_sequence_length`) and the embeddings / lm_head sequence length symbolic; the HTP rejects
symbolic shapes. Here every one becomes a number: the KV cache holds `context_length` positions,
and the embeddings and lm_head graphs come in a chunk form and a one-token form that share one
weights file. Files are copied, never linked: Olive's outputs are hard links into its cache,
which onnx refuses to read external data through.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import convert_model_to_external_data

OP_AFFINITY = "qnn_op_affinity.json"
# ONNX Runtime keeps GroupQueryAttention off the QNN EP unless its op affinity says otherwise.
AFFINITY = {"op_type": {"GroupQueryAttention": "htp"}}


def _fix_dims(model: onnx.ModelProto, sizes: dict[str, int]) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]  # clears dim_param (protobuf oneof)


def _symbolic(model: onnx.ModelProto) -> set[str]:
    return {d.dim_param for v in [*model.graph.input, *model.graph.output]
            for d in v.type.tensor_type.shape.dim if d.dim_param}


def _two_forms(src: Path, out: Path, stem: str, chunk: int) -> dict[str, str]:
    """`stem`_chunk.onnx and `stem`_token.onnx over one `stem`.onnx.data."""
    model = onnx.load(str(src))
    convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                   location=f"{stem}.onnx.data", size_threshold=0)
    shared = out / f"{stem}.shared.onnx"
    onnx.save(model, str(shared))  # writes the weights once; `model` now refers to them
    names = {}
    for form, seq in (("chunk", chunk), ("token", 1)):
        variant = onnx.load(str(shared), load_external_data=False)
        _fix_dims(variant, {"batch_size": 1, "sequence_length": seq})
        onnx.save(variant, str(out / f"{stem}_{form}.onnx"))
        names[f"{stem}_{form}"] = f"{stem}_{form}.onnx"
    shared.unlink()
    return names


def fix_shapes(olive_out: Path, out: Path, context_length: int, source: Path,
               tokenizer_files: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    genai = json.loads((olive_out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    stages = decoder["pipeline"][0]
    chunk = int(decoder["sliding_window"]["window_size"])
    for data in olive_out.glob("*.data"):
        if not data.name.startswith(("embeddings", "lm_head")):
            shutil.copyfile(data, out / data.name)
    graphs: dict[str, str] = {}
    kv_inputs, present_to_past, kv_shape, kv_dtype = [], {}, None, None
    slices = sorted(k for k in stages if k.startswith("context_"))
    for name, stage in stages.items():
        src = olive_out / stage["filename"]
        if name in ("embeddings", "lm_head"):
            graphs.update(_two_forms(src, out, name, chunk))
            continue
        model = onnx.load(str(src), load_external_data=False)
        _fix_dims(model, {"batch_size": 1, "past_sequence_length": context_length})
        left = _symbolic(model)
        if left:
            raise ValueError(f"{src.name}: shapes still symbolic after fixing: {sorted(left)}")
        onnx.save(model, str(out / stage["filename"]))
        graphs[name] = stage["filename"]
        for value in model.graph.input:
            if value.name.startswith("past_key_values.") and value.name not in kv_inputs:
                kv_inputs.append(value.name)
                kv_shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
                kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(
                    value.type.tensor_type.elem_type).name
        for value in model.graph.output:
            if value.name.startswith("present."):
                present_to_past[value.name] = value.name.replace("present.", "past_key_values.", 1)
    inputs = decoder["inputs"]
    eos = genai["model"].get("eos_token_id")
    spec = {"format": "phikit-qnn-pipeline/1", "graphs": graphs, "slices": len(slices),
            "chunk": chunk, "context_length": context_length, "kv_inputs": kv_inputs,
            "kv_shape": kv_shape, "kv_dtype": kv_dtype, "present_to_past": present_to_past,
            "seqlens_k": inputs["past_sequence_length"],
            "total_sequence_length": inputs["total_sequence_length"],
            "eos_token_id": eos, "op_affinity": OP_AFFINITY}
    (out / OP_AFFINITY).write_text(json.dumps(AFFINITY, indent=2) + "\n")
    for name in tokenizer_files:
        for where in (source, olive_out):
            if (where / name).is_file():
                shutil.copyfile(where / name, out / name)
                break
    # written last: its presence marks a complete pipeline (the backend recognizes it)
    (out / "qnn_pipeline.json").write_text(json.dumps(spec, indent=2) + "\n")
