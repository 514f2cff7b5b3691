"""The bundle runner: standard library only, plus ONE runtime module beside it.

This file is copied into every bundle (as phikit_runner/core.py) and is also what phikit itself
uses to measure parity, so what is validated is what runs on the device.

A runtime module (ortgenai.py, ...) exposes `open_session(model_dir, options) -> Session`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "phikit-bundle/1"
# Files the runner itself may create inside a bundle without it being tampering.
# (Python byte code; runtime caches such as OpenVINO's compiled-model cache under model/.cache;
# the runtime venv `phikit deploy` creates on a device).
IGNORED_PARTS = {"__pycache__", ".cache", ".venv"}


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
    """Every file under root except the manifest and runtime caches, as sorted posix paths."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.as_posix() != MANIFEST and not IGNORED_PARTS & set(rel.parts):
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


def _runtime_module(name: str):
    package = __package__ or "phikit_runner"
    try:
        return importlib.import_module(f"{package}.{name}")
    except ImportError as e:
        raise BundleError(f"runtime module {name!r} cannot be imported: {e}. Install the bundle's "
                          "requirements.lock (pip install --no-deps --require-hashes -r requirements.lock)") \
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


def stream_reply(session: Session, prompt_ids: list[int], sampling: Sampling,
                 out=sys.stdout) -> tuple[str, int, float]:
    """Generate and print as tokens arrive; returns (text, tokens, seconds)."""
    stream, parts, n = TextStream(session), [], 0
    start = time.perf_counter()
    for token in session.generate(prompt_ids, sampling):
        n += 1
        piece = stream.push(token)
        parts.append(piece)
        out.write(piece)
        out.flush()
    return "".join(parts), n, time.perf_counter() - start


def _report_speed(n: int, seconds: float) -> None:
    rate = n / seconds if seconds > 0 else 0.0
    print(f"\n[{n} tokens, {seconds:.2f} s, {rate:.1f} tok/s]", file=sys.stderr)


def chat_loop(session: Session, sampling: Sampling, system: str | None) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = chat_ids(session, messages)
        text, n, seconds = stream_reply(session, ids, sampling)
        _report_speed(n, seconds)
        messages.append({"role": "assistant", "content": text})


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run a phikit bundle.")
    ap.add_argument("command", nargs="?", choices=["generate", "verify", "serve"],
                    default="generate")
    ap.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="bundle directory (default: the one this runner sits in)")
    ap.add_argument("--prompt", help="prompt text; with --chat-format it is sent as a user turn")
    ap.add_argument("--chat", action="store_true", help="interactive chat")
    ap.add_argument("--raw", action="store_true", help="send --prompt as plain text, no chat template")
    ap.add_argument("--system", help="system message for chat prompts")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, help="override the bundle's thread count")
    ap.add_argument("--allow-failed", action="store_true", help="run a bundle that failed parity")
    ap.add_argument("--host", default="127.0.0.1", help="serve: address (loopback by default)")
    ap.add_argument("--port", type=int, default=8000, help="serve: port")
    ap.add_argument("--api-key", help="serve: require 'Authorization: Bearer KEY'")
    ap.add_argument("--in-process", action="store_true",
                    help="serve: run the runtime in the server's process (by default it runs "
                         "in a child that a crash restarts: the request fails with HTTP 500, "
                         "the server stays up)")
    return ap


def main(argv: list[str] | None = None, prog: str = "run.py") -> int:
    args = build_parser(prog).parse_args(argv)
    # Runtimes must not phone home from a device; the runtime modules also switch theirs off.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        if args.command == "verify":
            manifest = verify_bundle(args.bundle)
            print(f"ok: {len(manifest['files'])} files match {MANIFEST}")
            return 0
        overrides = {"threads": args.threads} if args.threads else {}
        session, manifest = open_bundle(args.bundle, allow_failed=args.allow_failed,
                                        overrides=overrides, worker=args.command == "serve"
                                        and not args.in_process)
        sampling = Sampling(max_new_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        if args.command == "serve":
            from .server import serve

            serve(session, manifest["name"], args.host, args.port, args.api_key)
            return 0
        if args.chat:
            chat_loop(session, sampling, args.system)
            return 0
        if args.prompt is None:
            print(f"{prog}: give --prompt TEXT or --chat", file=sys.stderr)
            return 2
        if args.raw:
            ids = session.tokenize(args.prompt)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            ids = chat_ids(session, messages)
        _, n, seconds = stream_reply(session, ids, sampling)
        _report_speed(n, seconds)
        return 0
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
