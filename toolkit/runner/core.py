"""The bundle runner: standard library only, plus ONE runtime module beside it.

This file is copied into every bundle (as phikit_runner/core.py) and is also what phikit itself
uses to measure parity, so what is validated is what runs on the device.

A runtime module (ortgenai.py, ...) exposes `open_session(model_dir, options) -> Session`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "phikit-bundle/1"
# The one directory of a bundle that is not part of it: the runtime venv `phikit deploy` creates
# beside run.py on a device. Everything else is hashed: byte code (the runner writes none: run.py
# and rpc.py run with -B), runtime caches (kept under the user's cache dir, never in the bundle)
# and anything planted is an unexpected file; a symbolic link is refused outright.
VENV_DIR = ".venv"


class BundleError(Exception):
    """The bundle is missing, modified or unusable. Exit code 2."""


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)


class Session(Protocol):
    """What a runtime module provides; the parity engine calls exactly these."""

    eos_token_ids: tuple[int, ...]
    context_length: int

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as the model's tokenizer makes them; with add_special_tokens, BOS where the
        tokenizer adds one (transformers' convention: chat prompts are tokenized without)."""

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied, with the generation prompt appended."""

    def logits(self, ids: Sequence[int]) -> Any:
        """Teacher-forced logits for every position: array [len(ids), vocab], float32."""

    def generate(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """New token ids, one at a time; stops at an EOS (not yielded) or max_new_tokens."""

    def info(self) -> dict[str, Any]:
        """runtime, version, device, ...; `notes`: what a reader of the figures must know, e.g.
        that they were measured on another device than the target's."""


# CPU features that change which kernels a runtime picks (and so its numbers, speed or crashes):
# AMX (llama.cpp's AMX buffer type, PyTorch bf16), AVX512-FP16 (OpenVINO honours an f16 hint only
# with native fp16), VNNI (int8 dot products), AVX2 (the baseline of x86-64-v3); on ARM, fp16
# arithmetic, dot product, int8 matmul and SVE.
CPU_FEATURES_OF_NOTE = ("amx_int8", "amx_bf16", "amx_tile", "avx512_fp16", "avx512_bf16",
                        "avx512_vnni", "avx512f", "avx_vnni", "avx2", "fma", "f16c",
                        "asimd", "asimdhp", "fphp", "asimddp", "i8mm", "sve")


def host_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's CPU as runtimes see it: model name, all flags, the flags of note, and a
    class ("amx", "avx512", "avx2", "x86-64", "arm64") for tables that choose runtime options."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    machine = platform.machine().lower()
    if "amx_int8" in flags or "amx_tile" in flags:
        cls = "amx"
    elif "avx512f" in flags:
        cls = "avx512"
    elif "avx2" in flags:
        cls = "avx2"
    elif machine in ("aarch64", "arm64"):
        cls = "arm64"
    else:
        cls = machine or "unknown"
    return {"model": model or platform.processor() or machine, "machine": machine,
            "class": cls, "flags": sorted(flags),
            "features": [f for f in CPU_FEATURES_OF_NOTE if f in flags],
            "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}"}


DEFAULT_CONTEXT = 4096  # a config that names no maximum length: Phi-3-mini-4k's


def thread_count(option: Any) -> int | None:
    """The `threads` runtime option: an int, or None for "auto" (the device's cores: runtimes'
    own defaults are often one thread or half the cores)."""
    return None if option in (None, "auto", 0) else int(option)


def auto_threads(option: Any) -> int:
    return thread_count(option) or os.cpu_count() or 1


def stop_ids(session: "Session", sampling: "Sampling") -> set[int]:
    """Where generation stops: the model's EOS ids and the caller's stop tokens."""
    return set(session.eos_token_ids) | set(sampling.stop_token_ids)


def check_length(n: int, context_length: int) -> None:
    """Runtimes fail in their own ways past the context; fail the same clear way in all."""
    if n > context_length:
        raise ValueError(f"{n} tokens exceed the model's context length {context_length}")


def generation_eos(model_dir: Path, default: Any = None) -> tuple[int, ...]:
    """The EOS ids generation stops at: generation_config.json's (Phi-3 lists several), else
    `default` (an id or list, e.g. config.json's); () when neither says."""
    eos = default
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos if isinstance(eos, list) else [eos])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file under root except the manifest and the top-level venv, as sorted posix paths.
    A symbolic link anywhere (to a file or a directory, inside or out) is a BundleError: a
    link can point a verified name at unverified bytes, or shadow a module."""
    out = []
    stack = [root]
    while stack:
        for p in sorted(stack.pop().iterdir()):
            rel = p.relative_to(root)
            if p.is_symlink():
                raise BundleError(f"{p}: a symbolic link inside the bundle (not allowed)")
            if p.is_dir():
                if rel.as_posix() != VENV_DIR:
                    stack.append(p)
            elif rel.as_posix() != MANIFEST:
                out.append(rel.as_posix())
    return sorted(out)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a phikit bundle ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a {BUNDLE_FORMAT} manifest")
    return manifest


def verify_bundle(root: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; refuse extra or missing files by name."""
    manifest = manifest or read_manifest(root)
    expected: dict[str, str] = manifest.get("files", {})
    present = set(bundle_files(root))
    for rel in sorted(expected):
        if rel not in present:
            raise BundleError(f"{root / rel}: listed in the manifest but missing")
        if sha256_file(root / rel) != expected[rel]:
            raise BundleError(f"{root / rel}: sha256 does not match the manifest (modified file)")
    extra = sorted(present - set(expected))
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in the manifest (unexpected file)")
    return manifest


def lock_install_args(lock: str = "requirements.lock", wheels: str | None = None) -> list[str]:
    """pip's arguments that install a bundle's lock and nothing else: the lock is pip's whole
    closure, so --no-deps installs exactly it; --require-hashes checks every file; with `wheels`,
    offline from the bundle's own wheel directory."""
    offline = ["--no-index", "--find-links", wheels] if wheels else []
    return ["install", "-q", "--no-deps", *offline, "--require-hashes", "-r", lock]


def _runtime_module(name: str):
    package = __package__ or "phikit_runner"
    try:
        return importlib.import_module(f"{package}.{name}")
    except ImportError as e:
        raise BundleError(f"runtime module {name!r} cannot be imported: {e}. Install the bundle's "
                          f"requirements.lock (pip {' '.join(lock_install_args())})") \
            from None


def open_session(runtime: str, model_dir: Path, options: dict[str, Any] | None = None) -> Session:
    module = _runtime_module(runtime)
    try:
        return module.open_session(Path(model_dir), dict(options or {}))
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        # Runtimes report a broken model dir in their own ways; name the dir and the runtime.
        raise BundleError(f"{model_dir}: {runtime} cannot open this model: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}") \
            from None


def open_bundle(root: Path, *, verify: bool = True, allow_failed: bool = False,
                overrides: dict[str, Any] | None = None,
                worker: bool = False) -> tuple[Session, dict[str, Any]]:
    """The bundle's Session; with worker=True the runtime runs in a child process (worker.py)
    that is started again after a crash, so a server outlives its runtime."""
    manifest = verify_bundle(root) if verify else read_manifest(root)
    verdict = manifest.get("parity", {}).get("verdict")
    if verdict != "pass" and not allow_failed:
        raise BundleError(f"{root}: parity verdict is {verdict!r}, not 'pass'; this bundle failed "
                          "validation (use --allow-failed to run it anyway)")
    runtime = manifest["runtime"]
    options = {**runtime.get("options", {}), **(overrides or {})}
    if worker:
        from .worker import WorkerOpenError, WorkerSession, rpc_command

        root = Path(root).resolve()
        cmd = rpc_command(runner=root, module=runtime["module"],
                          model_dir=root / manifest["model_dir"], options=options)
        try:
            return WorkerSession(cmd, label=runtime["module"], restart=True), manifest
        except WorkerOpenError as e:
            raise BundleError(str(e)) from None
    return open_session(runtime["module"], root / manifest["model_dir"], options), manifest


def chat_ids(session: Session, messages: list[dict[str, str]]) -> list[int]:
    """As transformers' apply_chat_template(tokenize=True): the template places special tokens."""
    return session.tokenize(session.render_chat(messages), add_special_tokens=False)


class TextStream:
    """Incremental detokenization: emit only complete text (byte-fallback pieces can span tokens).

    Decodes a short window (from the last emitted token's predecessor), not everything so far:
    decoding the whole reply per token grows quadratically with its length. Decoding the window
    with one token of context keeps SentencePiece's leading-space handling right."""

    def __init__(self, session: Session):
        self.session, self.ids = session, []
        self.prefix, self.read = 0, 0  # window start; end of what was emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.session.detokenize(self.ids[self.prefix:self.read])
        text = self.session.detokenize(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
