"""Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python),
optionally with an importance matrix computed from local calibration text. Run as a subprocess:
a quantizer abort (GGML_ABORT) must not take phikit down with it.

The importance matrix is what llama.cpp's `llama-imatrix` tool computes: for every matrix
multiplication, the mean over calibration tokens of the squared input activation, per input column.
Here the activations come from the full-precision checkpoint through transformers (the tool runs
the f16 GGUF; same quantity, and llama-cpp-python does not ship the tool). Tensor names are mapped
to GGUF names with the converter's own gguf-py name map, so they are the names the quantizer looks up.

Usage: python -m toolkit.backends.gguf_quantize '{"input": ..., "output": ..., "type": "Q4_K_M",
        "threads": 2, "imatrix": {"source": DIR, "calibration": FILE, "gguf_py": DIR, ...}}'
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np


def calibration_chunks(path: Path, tokenizer, chunk_tokens: int, max_chunks: int) -> list[list[int]]:
    """The calibration text as consecutive chunks of `chunk_tokens` ids (llama-imatrix's way)."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = chunk_tokens - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)][:max_chunks]


def compute_imatrix(spec: dict) -> dict[str, np.ndarray]:
    """{gguf tensor name: mean squared input activation per column (float32)}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, spec["gguf_py"])
    import gguf

    source = spec["source"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    arch = gguf.MODEL_ARCH[spec.get("gguf_arch", "PHI3")]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(module_name)
            if gguf_name is None:
                raise SystemExit(f"no GGUF name for {module_name}: cannot map the importance matrix")
            handles.append(module.register_forward_hook(hook(gguf_name + ".weight")))
    chunks = calibration_chunks(Path(spec["calibration"]), tokenizer,
                                int(spec.get("chunk_tokens", 512)), int(spec.get("max_chunks", 64)))
    if not chunks:
        raise SystemExit(f"{spec['calibration']}: too little text for one {spec.get('chunk_tokens', 512)}"
                         "-token chunk")
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    print(f"importance matrix: {len(sums)} tensors from {len(chunks)} chunks")
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def quantize(spec: dict) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec["ftype"])
    params.nthread = int(spec.get("threads") or 0)
    keep = []  # the C side only borrows these buffers
    if spec.get("imatrix"):
        matrix = compute_imatrix(spec["imatrix"])
        entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
        for i, (name, values) in enumerate(sorted(matrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(matrix)].name = None  # NULL-terminated
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(spec["input"].encode(), spec["output"].encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":
    quantize(json.loads(sys.argv[1]))
