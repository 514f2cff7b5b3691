"""A checkpoint's weights memory-mapped rather than loaded, and their pages given back as a
converter moves past them: what lets the real converters (backends/*_stream.py) run in less
memory than the checkpoint, and the reference run on a checkpoint larger than the machine's
memory (the kernel pages weights in and out; process memory holds activations only).

A page of a mapped checkpoint file is clean (nothing writes to it): dropping it from the process
loses nothing, a later read maps it again from the file (or the page cache). Without dropping,
every page a converter has read stays counted in its RSS until the kernel needs the memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

MADV_DONTNEED = 4
MADV_PAGEOUT = 21
PAGEOUT_PIECE = 1 << 30
SYS_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}


def mapped_model(path: Path, *, buffers: str = "meta", dtype=None):
    """The transformers model of the checkpoint at `path`, made on the meta device, its
    parameters the shards' memory-mapped tensors (safetensors maps a tensor without reading it),
    its generation config the checkpoint's own, as from_pretrained would give it.

    buffers: "meta" leaves computed buffers (rotary inv_freq) on the meta device, where a read
    fails loudly; "cpu" computes them, rebuilding each module that owns one from the config
    (a converter that traces the model needs them). dtype: the dtype the caller wants; a
    checkpoint of another dtype is refused (ValueError), since mapping cannot cast. Every
    refusal is a ValueError, so a caller can fall back to loading the model its own way."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    if dtype is not None and dtype != config.dtype:
        raise ValueError(f"the checkpoint is {config.dtype}, the converter asks for {dtype}")
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
    if buffers == "cpu":
        _compute_buffers(model)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _compute_buffers(model) -> None:
    """Rebuild, on the CPU, every module that owns a buffer left on the meta device (they are
    computed from the config at construction, e.g. the rotary embedding's inv_freq)."""
    import torch

    for name, module in list(model.named_modules()):
        if not any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{name} holds both a computed buffer and weights")
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
        except TypeError as e:
            raise ValueError(f"{name} ({type(module).__name__}) cannot be rebuilt from the "
                             f"config: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fresh)
    if any(b.device.type == "meta" for b in model.buffers()):
        raise ValueError("a computed buffer is still on the meta device")


def _assign(model, name: str, tensor) -> None:
    import torch

    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param] = torch.nn.Parameter(tensor, requires_grad=False)


def shard_files(path: Path) -> set[str]:
    """The checkpoint's safetensors shards, as /proc/self/maps names them."""
    return {str(p.resolve()) for p in Path(path).glob("*.safetensors")}


class PageReleaser:
    """Gives back this process's resident pages of the named mapped files (Linux: madvise
    MADV_DONTNEED on their mappings). Elsewhere, or without libc, it does nothing: the
    conversion is the same, only its resident set is larger."""

    def __init__(self, files: Iterable[str]):
        self.files = set(files)
        try:
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            # addresses are 64-bit: without argtypes ctypes passes C ints and nothing is released
            self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except OSError:
            self.libc = None

    def release(self) -> None:
        if self.libc is None or not self.files:
            return
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5] not in self.files:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            self.libc.madvise(start, end - start, MADV_DONTNEED)

    @contextmanager
    def while_running(self, every_s: float = 0.25) -> Iterator[None]:
        """Release the pages every `every_s` seconds while the body runs, and once after. For a
        converter's loop that offers no hook and holds the GIL (OpenVINO's serializer reads
        every weight in C++), so a thread of this process could not run: a helper process
        pages them out (process_madvise MADV_PAGEOUT, Linux 5.10+, needs CAP_SYS_NICE; where it
        is refused the conversion is the same, only its resident set is larger)."""
        helper = None
        if self.files and sys.platform.startswith("linux"):
            helper = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()),
                                       str(every_s), *sorted(self.files)],
                                      stdin=subprocess.PIPE, cwd=Path(__file__).parents[1])
        try:
            yield
        finally:
            if helper is not None:
                helper.stdin.close()  # the helper's signal to stop
                try:
                    helper.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    helper.kill()
            self.release()

    def after(self, fn: Callable) -> Callable:
        """`fn`, releasing the pages after every call (a converter's per-weight step)."""

        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                self.release()

        return wrapped


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def page_out(pid: int, files: set[str], every_s: float) -> None:
    """The helper process of PageReleaser.while_running: every `every_s` seconds, page out
    process `pid`'s resident pages of `files`, until its stdin closes."""
    number = SYS_PROCESS_MADVISE.get(os.uname().machine)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return
    if number is None:
        return
    libc.syscall.restype = ctypes.c_long
    while not select.select([sys.stdin], [], [], every_s)[0]:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            return
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5] not in files:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            # the kernel advises at most ~2 GB per call (MAX_RW_COUNT) and stops there
            for piece in range(start, end, PAGEOUT_PIECE):
                iov = _Iovec(piece, min(PAGEOUT_PIECE, end - piece))
                # every argument a full register: syscall() is variadic
                if libc.syscall(*map(ctypes.c_long, (number, pidfd, ctypes.addressof(iov), 1,
                                                     MADV_PAGEOUT, 0))) < 0 \
                        and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.ESRCH):
                    return  # refused (no CAP_SYS_NICE, an older kernel) or the process ended


if __name__ == "__main__":
    page_out(int(sys.argv[1]), set(sys.argv[3:]), float(sys.argv[2]))
