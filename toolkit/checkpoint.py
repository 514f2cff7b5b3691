"""Source checkpoints: resolve a local dir or HF hub id, fingerprint it, read its config."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from .errors import PhikitError
from .schema import HUB_ID
from .runner.core import sha256_file

# Files that define a checkpoint's behaviour; anything else (README, images) does not count.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.py", "*.txt")
# PyTorch's pickle formats: loading one runs whatever code the file carries
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickles(path: Path) -> Path:
    """A checkpoint's weights are read from safetensors only."""
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise PhikitError(f"weights only as pickle files ({', '.join(pickles[:3])}): phikit "
                              "reads safetensors only, because unpickling runs code from the "
                              "file. Convert once where you trust the file (transformers: "
                              "from_pretrained(...).save_pretrained(out, safe_serialization=True))",
                              file=path)
    return path


def cache_root() -> Path:
    return Path(os.environ.get("PHIKIT_CACHE", Path.home() / ".cache" / "phikit"))


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Held while one process fills the cache entry `name` (a conversion, a reference, a
    validation, an emulated root): processes sharing a cache (a CI matrix on one runner, test
    workers) wait for the first and then find its entry, instead of computing it again or
    writing over each other. Not re-entrant: never nest two locks of the same name."""
    path = cache_root() / "inflight" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def fill_cache_dir(dest: Path, name: str, ready: Callable[[Path], bool],
                   fill: Callable[[Path], None]) -> Path:
    """`dest`, filled by `fill(staging)` unless `ready(dest)` already: under cache_lock(name),
    staged beside it and renamed into place, so a failed or interrupted fill leaves nothing that
    looks complete and concurrent processes fill it once."""
    with cache_lock(name):
        if ready(dest):  # another process filled it meanwhile
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            staged = Path(tmp) / "staged"
            fill(staged)
            shutil.rmtree(dest, ignore_errors=True)
            staged.rename(dest)  # whole or not at all
    return dest


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local checkpoint dir, or a hub id fetched (or found in the HF cache) offline-first."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PhikitError("not a checkpoint directory (config.json missing)", file=path)
        return refuse_pickles(path.resolve())
    if source.startswith(("/", ".", "~")) or not HUB_ID.match(source):
        raise PhikitError(f"checkpoint directory not found: {source} (pass --reference DIR or "
                          "a hub id)")
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(source, revision=revision,
                                          allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "not here"
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise PhikitError(f"cannot fetch {source!r} from the Hugging Face hub: {why} "
                          f"({type(e).__name__}). Offline (HF_HUB_OFFLINE=1) only HF_HOME's "
                          "cache is read; download the checkpoint and pass --source DIR") \
            from None
    return refuse_pickles(check_complete(snapshot, source))


def check_complete(snapshot: Path, source: str) -> Path:
    """Offline, the hub client returns a cached snapshot as it is, even one whose download was
    cut short: its config and every weights file it names must be there."""
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            raise PhikitError("unreadable safetensors index", file=index) from None
        missing += sorted(f for f in shards if not (snapshot / f).is_file())
    elif not any(p for pattern in ("*.safetensors", *PICKLE_WEIGHTS)
                 for p in snapshot.glob(pattern)):
        missing.append("model.safetensors")
    if missing:
        raise PhikitError(f"the Hugging Face cache holds an incomplete {source!r} (missing "
                          f"{', '.join(missing[:4])}): an interrupted download? Run it again "
                          "online (or `huggingface-cli download`), or pass --source DIR",
                          file=snapshot)
    return snapshot


def checkpoint_files(path: Path) -> list[Path]:
    files = {p for pattern in CHECKPOINT_FILES for p in path.glob(pattern) if p.is_file()}
    return sorted(files)


_HASHED: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process while its inode, size and mtime stay the
    same: a build hashes the staged model for the validation key and again for the manifest
    (gigabytes each time for Phi-3-medium)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path.resolve())  # a hub snapshot links to its blob
    return _HASHED[key]


def checkpoint_digest(path: Path) -> str:
    """sha256 over (name, sha256) of the checkpoint's files, memoised by size+mtime."""
    memo_path = cache_root() / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for f in checkpoint_files(path):
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(f)
            changed = True
        h.update(f"{f.name}\0{memo[key]}\n".encode())
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_positions: int
    original_max_positions: int
    raw: dict[str, Any]

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.raw.get("intermediate_size", 4 * self.hidden_size))

    def parameter_count(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_size
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * self.intermediate_size
        tied = self.raw.get("tie_word_embeddings", False)
        return self.num_layers * per_layer + self.vocab_size * h * (1 if tied else 2)

    def memory_estimate(self, bits: int, context: int, kv_bytes: int = 4) -> tuple[int, int]:
        """(weight bytes, KV-cache bytes): block-quantized weights carry ~1/16 more for their
        scales; CPU runtimes keep the KV cache in fp32 (kv_bytes=4)."""
        weights = self.parameter_count() * bits / 8 * (1.0625 if bits < 16 else 1.0)
        kv = 2 * self.num_layers * self.num_kv_heads * self.head_size * context * kv_bytes
        return int(weights), int(kv)

    @property
    def sliding_window(self) -> int | None:
        """The attention window, when a sequence can be longer than it (else None)."""
        window = self.raw.get("sliding_window")
        return int(window) if window and int(window) < self.max_positions else None

    @property
    def longrope(self) -> bool:
        return self.max_positions != self.original_max_positions


def read_model_info(path: Path) -> ModelInfo:
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PhikitError(f"cannot read: {e}", file=cfg_path) from None
    return model_info_from_config(cfg, cfg_path)


def model_info_from_config(cfg: dict[str, Any], where: Path | str) -> ModelInfo:
    """From config.json as the checkpoints publish it (transformers 4.x key names)."""
    try:
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_scaling") or {}
        return ModelInfo(
            architecture=(cfg.get("architectures") or ["?"])[0],
            model_type=cfg["model_type"],
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            max_positions=int(cfg.get("max_position_embeddings", 4096)),
            original_max_positions=int(cfg.get("original_max_position_embeddings")
                                       or rope.get("original_max_position_embeddings")
                                       or cfg.get("max_position_embeddings", 4096)),
            raw=cfg,
        )
    except KeyError as e:
        raise PhikitError("missing field", file=where, field=e.args[0]) from None
    except (TypeError, ValueError) as e:
        raise PhikitError(f"bad value: {e}", file=where) from None
