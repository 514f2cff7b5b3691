"""Each backend's own file format, at the level a defect is planted: a writable view of one stored
tensor, one metadata value, one JSON file. Edits go through the format itself (ONNX's external-data
table, the OpenVINO IR's XML, the safetensors header, gguf-py), never through phikit or a runtime,
so what the validator sees is what a broken converter would have written.

Also the bundle plumbing every defect shares: copy a bundle, re-write its manifest's sha256 entries
(so the manifest check is not what catches a defect), run the real `phikit validate`.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape

import numpy as np

from conftest import phikit
from toolkit.runner.core import MANIFEST, bundle_files, sha256_file

# --- bundle plumbing ------------------------------------------------------------------------


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy to plant into; the session's honest bundles are never modified."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".cache"))
    return dst


def rehash_manifest(bundle: Path) -> None:
    """manifest.json "files" = the sha256 of every file now in the bundle (added, changed and
    removed files included), as the packager writes it: the planted file passes `verify`."""
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"] = {rel: sha256_file(bundle / rel) for rel in bundle_files(bundle)}
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def validate(bundle: Path, report: Path, timeout: int = 1800) -> tuple[int, dict | None, str]:
    """(exit code, report or None, console output) of the real `phikit validate BUNDLE --json`."""
    proc = phikit("validate", bundle, "--json", report, timeout=timeout)
    data = json.loads(report.read_text()) if report.is_file() else None
    return proc.returncode, data, proc.stdout + proc.stderr


def edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- ONNX: model.onnx + external data -------------------------------------------------------


class OnnxModel:
    """model.onnx's graph (loaded without its weights) and writable views of the initializers in
    its external data file."""

    def __init__(self, model_dir: Path):
        import onnx

        self.dir, self.path = model_dir, model_dir / "model.onnx"
        self.proto = onnx.load(str(self.path), load_external_data=False)
        self.initializers = {t.name: t for t in self.proto.graph.initializer}

    def names(self, pattern: str) -> list[str]:
        return sorted(n for n in self.initializers if re.fullmatch(pattern, n))

    def tensor(self, name: str) -> np.memmap:
        from onnx import TensorProto, helper

        t = self.initializers[name]
        if t.data_location != TensorProto.EXTERNAL:
            raise ValueError(f"{name} is stored inside model.onnx, not in external data")
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        return np.memmap(self.dir / info["location"], dtype=dtype, mode="r+",
                         offset=int(info.get("offset", 0)), shape=tuple(t.dims))

    def constant(self, name: str):
        """The TensorProto of a Constant node's value, subgraphs included (LongRoPE's two RoPE
        tables live in the branches of an If); stored inline in model.onnx."""
        for graph in self._graphs(self.proto.graph):
            for node in graph.node:
                if node.op_type == "Constant" and list(node.output) == [name]:
                    return next(a.t for a in node.attribute if a.name == "value")
        raise KeyError(name)

    @staticmethod
    def array(t) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(t)

    @staticmethod
    def set_array(t, value: np.ndarray) -> None:
        """Replace an inline tensor's values (same shape and type); save_graph() writes them."""
        from onnx import helper

        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        value = np.asarray(value, dtype)
        assert list(value.shape) == list(t.dims), (value.shape, list(t.dims))
        t.ClearField("float_data")
        t.raw_data = value.tobytes()

    def _graphs(self, graph):
        yield graph
        for node in graph.node:
            for a in node.attribute:
                if a.g.node:
                    yield from self._graphs(a.g)

    def save_graph(self) -> None:
        """Write model.onnx only (graph edits); the external data file is left as it is. The
        backend derives the all-logits graph from model.onnx after conversion, so a converter's
        defect is in both: it is derived again, as the backend would."""
        import onnx

        from toolkit.backends.onnx import write_all_logits_graph

        onnx.save_model(self.proto, str(self.path))
        write_all_logits_graph(self.path.parent)


# --- OpenVINO IR: XML + bin -----------------------------------------------------------------

IR_DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32,
             "u8": np.uint8, "i8": np.int8, "u4": np.uint8, "i4": np.uint8}  # 4-bit: packed bytes


class OpenVinoIR:
    """The IR's constants by layer name, as its XML lists them (offset/size in the .bin), and which
    layers consume them (the XML's edges)."""

    def __init__(self, model_dir: Path, stem: str = "openvino_model"):
        self.xml, self.bin = model_dir / f"{stem}.xml", model_dir / f"{stem}.bin"
        root = ET.parse(self.xml).getroot()
        names = {lay.get("id"): lay.get("name") for lay in root.iter("layer")}
        self.consts: dict[str, dict[str, str]] = {
            lay.get("name"): lay.find("data").attrib for lay in root.iter("layer")
            if lay.get("type") == "Const"}
        self.consumers: dict[str, list[str]] = {}
        for edge in root.iter("edge"):
            self.consumers.setdefault(names[edge.get("from-layer")], []).append(
                names[edge.get("to-layer")])

    def tensor(self, name: str) -> np.memmap:
        d = self.consts[name]
        dtype = np.dtype(IR_DTYPES[d["element_type"]])
        shape = tuple(int(s) for s in d["shape"].split(",") if s.strip()) or (1,)
        if d["element_type"] in ("u4", "i4"):
            shape = (int(d["size"]),)
        return np.memmap(self.bin, dtype=dtype, mode="r+", offset=int(d["offset"]), shape=shape)

    def element_type(self, name: str) -> str:
        return self.consts[name]["element_type"]

    def consumed_by(self, prefix: str) -> list[str]:
        """Constants that feed a layer whose name starts with prefix (OpenVINO keeps the PyTorch
        module path in layer names: RMSNorm weights are anonymous constants feeding
        `__module.model.layers.N.post_attention_layernorm/aten::mul/Multiply_1`)."""
        return sorted(c for c in self.consts
                      if any(u.startswith(prefix) for u in self.consumers.get(c, [])))


def set_ir_rt_info(xml: Path, key: str, change: Callable[[str], str]) -> None:
    """Change one rt_info value (e.g. the tokenizer IR's chat_template) in the XML text itself."""
    text = xml.read_text(encoding="utf-8")
    pattern = re.compile(rf'(<{key} value=")([^"]*)(")')
    match = pattern.search(text)
    if not match:
        raise ValueError(f"{xml.name} has no rt_info {key}")
    new = escape(change(html.unescape(match.group(2))), {'"': "&quot;", "\n": "&#10;"})
    xml.write_text(text[:match.start(2)] + new + text[match.end(2):], encoding="utf-8")


# --- MLX: safetensors + config.json ----------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "U32": np.uint32, "U8": np.uint8,
                      "I32": np.int32}


def safetensors_names(path: Path) -> list[str]:
    return sorted(k for k in _safetensors_header(path)[1] if k != "__metadata__")


def safetensors_tensor(path: Path, name: str) -> np.memmap:
    """A writable view of one tensor, located through the file's JSON header."""
    start, header = _safetensors_header(path)
    info = header[name]
    begin, _ = info["data_offsets"]
    return np.memmap(path, dtype=SAFETENSORS_DTYPES[info["dtype"]], mode="r+",
                     offset=start + begin, shape=tuple(info["shape"]))


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


# --- GGUF: gguf-py from the pinned llama.cpp --------------------------------------------------


def gguf_py():
    """llama.cpp's own gguf-py, as phikit imports it (the converter's copy, not a PyPI one)."""
    from toolkit.backends.llama_cpp_source import converter_dir

    path = str(converter_dir() / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def gguf_file(model_dir: Path) -> Path:
    (path,) = model_dir.glob("*.gguf")
    return path


def gguf_reader(model_dir: Path, mode: str = "r+"):
    """The GGUF memory-mapped: with r+, tensor data and scalar values are writable in place."""
    return gguf_py().GGUFReader(gguf_file(model_dir), mode)


def gguf_tensors(reader, pattern: str) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors if re.fullmatch(pattern, t.name)}


def gguf_scalar(reader, key: str) -> np.ndarray:
    """The one-element array holding a scalar metadata value (writable with mode r+)."""
    field = reader.fields[key]
    return field.parts[field.data[0]]


def gguf_rewrite(model_dir: Path, values: dict[str, Any]) -> None:
    """Write the GGUF again with some metadata values replaced (strings and arrays change the
    file's layout, so they cannot be edited in place): gguf-py's own gguf_new_metadata copy."""
    gguf = gguf_py()
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    path = gguf_file(model_dir)
    tmp = path.with_name(path.name + ".tmp")
    reader = gguf.GGUFReader(path, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    details = {}
    for key, value in values.items():
        types = reader.fields[key].types
        details[key] = MetadataDetails(types[0], value,
                                       sub_type=types[-1] if len(types) > 1 else None)
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    copy_with_new_metadata(reader, writer, details, [])
    del reader
    tmp.replace(path)
