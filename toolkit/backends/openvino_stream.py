"""optimum-intel's OpenVINO export, driven so that its memory does not grow with the model.

`python -m toolkit.backends.openvino_stream <optimum-cli arguments>` runs optimum-cli's own
command line (`optimum-cli export openvino ...`) with three of its steps changed:

- **weights are mapped, not loaded**: the export's `TasksManager.get_model_from_task` gets the
  transformers model made on the meta device, every parameter the checkpoint's own tensor,
  memory-mapped from its safetensors shards (toolkit/mapped_weights.py). optimum-intel's
  `from_pretrained` instead reads the whole checkpoint into process memory, and OpenVINO's
  converter shares the torch tensors, so the float IR is written straight from the file.
- **the checkpoint's pages are given back while OpenVINO writes the float IR**: its serializer
  reads every weight in C++ without a hook, so a thread releases the shards' resident pages
  while `save_model` runs (they are clean: nothing is lost, a re-read maps them again).
- **the float IR's pages are given back after each weight is compressed**: optimum-intel then
  reads the float IR back (memory-mapped) and NNCF compresses it one weight at a time; after
  each weight the pages it read are released.

The export, the compression and every file written are optimum-intel's and NNCF's own: the
same arguments give the same files either way (tests/test_openvino_stream.py). A checkpoint or
request the mapping does not cover (remote code, another dtype than the checkpoint's, a hub id,
other tasks) runs optimum-intel's own loading.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..mapped_weights import PageReleaser, mapped_model, shard_files

MAPPED_TASKS = {"text-generation", "text-generation-with-past"}


def _requested_dtype(kwargs: dict[str, Any]):
    import torch

    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    return dtype


def _mappable(task: str, path: Path, kwargs: dict[str, Any]) -> str | None:
    """Why optimum-intel's own loading must run, or None when the model can be mapped."""
    if task not in MAPPED_TASKS:
        return f"task {task}"
    if not (path.is_dir() and any(path.glob("*.safetensors"))):
        return "not a local safetensors checkpoint"
    if kwargs.get("trust_remote_code") or kwargs.get("subfolder") or kwargs.get("device") not in (
            None, "cpu"):
        return "remote code, a subfolder or a device"
    if _requested_dtype(kwargs) is None:
        return "no dtype requested"
    return None


def main(argv: list[str]) -> None:
    import optimum.exporters.openvino.__main__ as export_main
    import optimum.exporters.openvino.convert as export_convert
    from nncf.quantization.algorithms.weight_compression.openvino_backend import (
        OVWeightCompressionAlgoBackend as Backend)
    from optimum.commands.optimum_cli import main as optimum_cli
    from optimum.exporters.tasks import TasksManager

    get_model, save_model = TasksManager.get_model_from_task, export_convert.save_model
    main_quantize, compress = export_main._main_quantize, Backend._create_compression_subgraph
    checkpoint = PageReleaser(())
    float_ir = PageReleaser(())

    def get_model_mapped(task, model_name_or_path, **kwargs):
        path = Path(model_name_or_path)
        why = _mappable(task, path, kwargs)
        if why is None:
            dtype = _requested_dtype(kwargs)
            try:
                model = mapped_model(path, buffers="cpu", dtype=None if dtype == "auto" else dtype)
                checkpoint.files = shard_files(path)
                print(f"[phikit] weights mapped from {path.name}'s safetensors, not loaded",
                      flush=True)
                return model
            except (ValueError, OSError) as e:
                why = str(e)
        print(f"[phikit] weights not mapped ({why}); loading them as optimum-intel does",
              flush=True)
        return get_model(task, model_name_or_path, **kwargs)

    def save_model_releasing(*args, **kwargs):
        with checkpoint.while_running():
            return save_model(*args, **kwargs)

    def main_quantize_releasing(*args, **kwargs):
        output = kwargs.get("output")  # optimum-cli passes it by name
        if output is not None:
            float_ir.files = {str(p.resolve()) for p in Path(output).rglob("*.bin")}
            print("[phikit] compressing with the float IR's pages released after each weight",
                  flush=True)
        return main_quantize(*args, **kwargs)

    TasksManager.get_model_from_task = staticmethod(get_model_mapped)
    export_convert.save_model = save_model_releasing
    export_main._main_quantize = main_quantize_releasing
    Backend._create_compression_subgraph = float_ir.after(compress)
    sys.argv = ["optimum-cli", *argv]
    optimum_cli()


if __name__ == "__main__":
    main(sys.argv[1:])
