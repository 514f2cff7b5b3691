"""The bundle runner: standard library only, plus ONE runtime module beside it.

This file is copied into every bundle (as phikit_runner/core.py) and is also what phikit itself
uses to measure parity, so what is validated is what runs on the device.

A runtime module (ortgenai.py, ...) exposes `open_session(model_dir, options) -> Session`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

# what this machine is (host.py), re-exported: runtimes and phikit read it from here
from .host import (AUTO, CPU_FEATURES_OF_NOTE, HostRule, HostTable, available_cpus,  # noqa: F401
                   host_cpu, host_summary, one_copy_at_a_time, one_of)

# what a bundle is and whether it may run: trust.py (run.py runs the same source first)
from .trust import (BUNDLE_FORMAT, MANIFEST, SIGNATURE, SIGNATURE_NAMESPACE,  # noqa: F401
                    TRUSTED_KEY_ENV, TUNED, VENV_DIR, BundleError, bundle_files, bundle_tree,
                    manifest_files, read_manifest, sha256_file, trusted_key, verify,
                    verify_bundle, verify_files, verify_signature, verify_unchanged)


def quiet_runtimes() -> None:
    """A runner on someone's device sends nothing anywhere, so this runs before any runtime is
    imported. ONNX Runtime and ORT GenAI (1DS telemetry on Linux/macOS: a device id under
    ~/.cache/Microsoft and uploads) read ORT_DISABLE_TELEMETRY once, when they initialize.
    OpenVINO's Python package reports usage to Google Analytics through openvino_telemetry at
    `import openvino` (writing ~/intel), with no switch but a consent file in the user's home;
    a blocked import makes it fall back to its own no-op stub. An explicit
    ORT_DISABLE_TELEMETRY=0 from the user is left as it is."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.modules.setdefault("openvino_telemetry", None)  # None: `import` raises ImportError


quiet_runtimes()


# a bundle, recipe or target name: it becomes a directory, a service unit and a shell word.
# NAME is matched whole (fullmatch: `$` would accept a final newline); NAME_PATTERN is the same
# for pydantic, whose (Rust) regex reads `$` as the end of the text
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_PATTERN = rf"^{NAME.pattern}$"
_MODULE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# the runner's own modules, shipped beside the runtime module: never a manifest's runtime
RUNNER_MODULES = ("core", "host", "cli", "server", "openai_api", "rpc", "worker", "hf_tokens",
                  "parity_core", "logprobs", "reference_data", "device", "tune", "trust",
                  "structured", "guidance")


def parity_verdict(data: dict[str, Any]) -> Any:
    """manifest.json's parity.verdict as written (None when it has none): open_bundle reads it
    before the other fields, Manifest.parse checks it is one."""
    parity = data.get("parity")
    return parity.get("verdict") if isinstance(parity, dict) else None


@dataclass(frozen=True)
class Manifest:
    """What the runner trusts in manifest.json, checked field by field before anything is
    opened: a name that is a name; a model directory, a runtime module, an eval set and a
    reference that are the bundle's own hashed files, not paths out of it. Readers read these
    fields, never the document itself (which is not kept)."""
    name: str
    backend: str
    model_dir: str
    runtime_module: str
    runtime_options: dict[str, Any]
    files: dict[str, str]
    verdict: str | None
    # None where the manifest has none (a bundle not built by phikit; `run.py validate` and
    # `tune` then say what it lacks)
    eval_file: str | None
    reference_file: str | None
    recipe: dict[str, Any]  # the build's recipe (device validation: its bounds, eval options)
    target: dict[str, Any]  # the build's target (its name; deploy: its platform)
    created: str | None

    @classmethod
    def parse(cls, data: Any, path: Path) -> Manifest:
        def bad(fieldname: str, why: str) -> BundleError:
            return BundleError(f"{path}: field {fieldname!r}: {why}")

        def mapping(fieldname: str) -> dict[str, Any]:
            value = data.get(fieldname, {})
            if not isinstance(value, dict):
                raise bad(fieldname, "not a mapping")
            return value

        def own_file(fieldname: str) -> str | None:
            """A file the runner opens: one of the bundle's hashed files, when given."""
            if fieldname not in data:
                return None
            rel = data[fieldname]
            if not isinstance(rel, str) or rel not in files:
                raise bad(fieldname, f"{rel!r} is not one of this bundle's files")
            return rel

        files = manifest_files(data, path)
        name = data.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad("name", f"{name!r} is not a name (letters, digits, '.', '_', '-')")
        model_dir = data.get("model_dir")
        if (not isinstance(model_dir, str) or not NAME.fullmatch(model_dir)
                or not any(rel.startswith(model_dir + "/") for rel in files)):
            raise bad("model_dir", f"{model_dir!r} is not a directory of this bundle's files")
        runtime = data.get("runtime")
        module = runtime.get("module") if isinstance(runtime, dict) else None
        if not isinstance(module, str) or not _MODULE.fullmatch(module) or module in RUNNER_MODULES \
                or f"phikit_runner/{module}.py" not in files:
            raise bad("runtime.module", f"{module!r} is not a runtime module of this bundle")
        options = runtime.get("options", {})
        if not isinstance(options, dict):
            raise bad("runtime.options", "not a mapping")
        verdict = parity_verdict(data)
        if verdict not in (None, "pass", "fail"):
            raise bad("parity.verdict", f"{verdict!r} is not pass or fail")
        created = data.get("created")
        if created is not None and not isinstance(created, str):
            raise bad("created", f"{created!r} is not a string")
        return cls(name=name, backend=str(data.get("backend", "")), model_dir=model_dir,
                   runtime_module=module, runtime_options=options, files=files,
                   verdict=verdict, eval_file=own_file("eval_file"),
                   reference_file=own_file("reference_file"), recipe=mapping("recipe"),
                   target=mapping("target"), created=created)


@dataclass(frozen=True)
class Constraint:
    """What a generation's text must be: one JSON value valid against `schema` (a JSON Schema;
    {"type": "object"} for any object). `field` is the request field that asked for it, so that
    a runtime that cannot constrain is refused naming it. Runtimes get the schema as text
    (`schema_text`): compact JSON, and the x-guidance options llguidance reads (ORT GenAI's
    guidance is llguidance too): no free whitespace, which a weak model could otherwise fill
    until max_tokens cuts the JSON."""
    schema: dict[str, Any]
    field: str = "response_format"

    def schema_text(self) -> str:
        guided = {**self.schema, "x-guidance": {"whitespace_flexible": False,
                                                 **self.schema.get("x-guidance", {})}}
        return json.dumps(guided, separators=(",", ":"))


class CannotConstrain(ValueError):
    """A runtime asked for a Constraint it cannot enforce (the server answers 400)."""


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    constraint: Constraint | None = None

    def wire(self) -> dict[str, Any]:
        """As JSON for the worker protocol (rpc.py), read back by `from_wire`."""
        out = {k: getattr(self, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                              "seed")}
        out["stop_token_ids"] = list(self.stop_token_ids)
        if self.constraint is not None:
            out["constraint"] = {"schema": self.constraint.schema,
                                 "field": self.constraint.field}
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Sampling":
        constraint = data.get("constraint")
        return cls(**{**data, "constraint": Constraint(**constraint) if constraint else None})


def check_constraint(session: "Session", sampling: "Sampling") -> None:
    """CannotConstrain when `sampling` asks for a constraint `session` has no mechanism for:
    never a generation that silently ignores it."""
    if sampling.constraint is not None and not getattr(session, "constrains", None):
        raise CannotConstrain(f"'{sampling.constraint.field}': this runtime cannot constrain "
                              "its output (no structured-output mechanism)")


class Session(Protocol):
    """What a runtime module provides; the parity engine calls exactly these."""

    eos_token_ids: tuple[int, ...]
    context_length: int
    # how it enforces Sampling.constraint (e.g. "llguidance"); None: it cannot, and is never
    # asked to (the server answers 400 naming the field)
    constrains: str | None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as the model's tokenizer makes them; with add_special_tokens, BOS where the
        tokenizer adds one (transformers' convention: chat prompts are tokenized without)."""

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template applied, with the generation prompt appended."""

    def logits(self, ids: Sequence[int], start: int = 0) -> Any:
        """Teacher-forced logits for the positions from `start` on: array [len(ids) - start,
        vocab], float32. Every token still enters the model; a runtime that can leave out the
        vocabulary projection of the positions before `start` does (validation's pass over a
        prompt and its generation needs only the generated positions)."""

    def generate(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """New token ids, one at a time; stops at an EOS (not yielded) or max_new_tokens."""

    def info(self) -> dict[str, Any]:
        """runtime, version, device, ...; `notes`: what a reader of the figures must know, e.g.
        that they were measured on another device than the target's."""


DEFAULT_CONTEXT = 4096  # a config that names no maximum length: Phi-3-mini-4k's


def thread_count(option: Any) -> int | None:
    """The `threads` runtime option: an int, or None for "auto" (the device's cores: runtimes'
    own defaults are often one thread or half the cores)."""
    return None if option in (None, "auto", 0) else int(option)


def auto_threads(option: Any) -> int:
    return thread_count(option) or available_cpus()


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


def check_bundle(root: Path, public_key: Path | None = None) -> tuple[Manifest, str]:
    """The trust policy (verify: every file; the signature by `public_key`, else
    $PHIKIT_TRUSTED_KEY), then every manifest field the runner acts on: what `verify` commands
    say ok to is what open_bundle would open. Also returns what the signature established."""
    manifest, _, signed = verify(root, public_key)
    return Manifest.parse(manifest, Path(root) / MANIFEST), signed


def check_files(root: Path) -> Manifest:
    """check_bundle without the signature: what `phikit sign` signs (it replaces the
    signature, so neither an old one nor a configured key has a say)."""
    return Manifest.parse(verify_files(root), Path(root) / MANIFEST)


def lock_install_args(lock: str = "requirements.lock", wheels: str | None = None) -> list[str]:
    """pip's arguments that install a bundle's lock and nothing else: the lock is pip's whole
    closure, so --no-deps installs exactly it; --require-hashes checks every file; with `wheels`,
    offline from the bundle's own wheel directory."""
    offline = ["--no-index", "--find-links", wheels] if wheels else []
    return ["install", "-q", "--no-deps", *offline, "--require-hashes", "-r", lock]


def runtime_module(name: str):
    """A runtime module of the runner by name; BundleError (with the install step) when it or
    its runtime cannot be imported here."""
    package = __package__ or "phikit_runner"
    try:
        return importlib.import_module(f"{package}.{name}")
    except ImportError as e:
        raise BundleError(f"runtime module {name!r} cannot be imported: {e}. Install the bundle's "
                          f"requirements.lock (pip {' '.join(lock_install_args())})") \
            from None


def open_session(runtime: str, model_dir: Path, options: dict[str, Any] | None = None) -> Session:
    module = runtime_module(runtime)
    try:
        session = module.open_session(Path(model_dir), dict(options or {}))
        if not getattr(session, "special_tokens", None):
            session.special_tokens = special_token_strings(Path(model_dir))
        return session
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        # Runtimes report a broken model dir in their own ways; name the dir and the runtime.
        raise BundleError(f"{model_dir}: {runtime} cannot open this model: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}") \
            from None


def bundle_options(root: Path, typed: "Manifest",
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runtime options in force: the build's, a device's measured choice (tuned.json),
    then the caller's."""
    return {**typed.runtime_options, **tuned_options(root), **(overrides or {})}


def open_bundle(root: Path, *, allow_failed: bool = False,
                overrides: dict[str, Any] | None = None, worker: bool = False,
                key: Path | None = None) -> tuple[Session, Manifest]:
    """The bundle's Session and its checked manifest, once it passes the trust policy
    (verify_bundle; `key` over $PHIKIT_TRUSTED_KEY); with worker=True the runtime runs in a
    child process (worker.py) that is started again after a crash, so a server outlives its
    runtime."""
    manifest, digest, _ = verify(root, key)
    verdict = parity_verdict(manifest)
    if verdict != "pass" and not allow_failed:  # first: the most useful thing to hear
        raise BundleError(f"{root}: parity verdict is {verdict!r}, not 'pass'; this bundle "
                          "failed validation (use --allow-failed to run it anyway)")
    typed = Manifest.parse(manifest, Path(root) / MANIFEST)
    options = bundle_options(root, typed, overrides)
    if worker:
        from .worker import WorkerOpenError, WorkerSession, rpc_command

        root = Path(root).resolve()
        cmd = rpc_command(runner=root, module=typed.runtime_module,
                          model_dir=root / typed.model_dir, options=options)
        try:
            return WorkerSession(cmd, label=typed.runtime_module, restart=True,
                                 before_restart=lambda: verify_unchanged(root, digest, key)
                                 ), typed
        except WorkerOpenError as e:
            raise BundleError(str(e)) from None
    return open_session(typed.runtime_module, root / typed.model_dir, options), typed


# --- tuned.json: a device's measured options (written by tune.py, read wherever a bundle opens)

TUNED_MAX_THREADS = 1024


def host_table(runtime: str) -> HostTable:
    """A runtime module's options that depend on the CPU (HOST_TABLE; none when it has none):
    besides `threads`, what `run.py tune` may measure and set."""
    return getattr(runtime_module(runtime), "HOST_TABLE", None) or HostTable(choices={})


def read_tuned(root: Path) -> dict[str, Any] | None:
    path = Path(root) / TUNED
    if not path.is_file():
        return None
    runtime = Manifest.parse(read_manifest(root), Path(root) / MANIFEST).runtime_module
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["options"] = host_table(runtime).checked(data.get("options"), TUNED_MAX_THREADS)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise BundleError(f"{path}: not a tuned-options file phikit wrote ({e}); delete it or "
                          "run `run.py tune` again") from None
    return data


def tuned_options(root: Path) -> dict[str, Any]:
    """The options in tuned.json when it was measured on this CPU, else none."""
    tuned = read_tuned(root)
    if tuned is None or tuned.get("cpu") != host_cpu()["model"]:
        return {}
    return tuned["options"]


def describe_tuned(root: Path) -> str | None:
    tuned = read_tuned(root)
    if tuned is None:
        return None
    opts = ", ".join(f"{k}={v}" for k, v in tuned["options"].items())
    if tuned.get("cpu") != host_cpu()["model"]:
        return f"{TUNED} ({opts}) was measured on {tuned.get('cpu')!r}, not this CPU: not used"
    return f"tuned options in force ({TUNED}): {opts}"


def special_token_strings(model_dir: Path) -> tuple[str, ...]:
    """The texts a tokenizer turns into its added (control) tokens wherever they appear: the
    model dir's tokenizer.json added_tokens (every runtime's bundle carries that file)."""
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
        added = data.get("added_tokens", [])
        return tuple(sorted({t["content"] for t in added if isinstance(t, dict)
                             and isinstance(t.get("content"), str) and len(t["content"]) > 1},
                            key=len, reverse=True))
    except (OSError, ValueError, AttributeError):
        return ()


def chat_ids(session: Session, messages: list[dict[str, str]]) -> list[int]:
    """As transformers' apply_chat_template(tokenize=True): the template places special tokens.
    Message contents are text: a content that spells a control token (`<|end|>\n<|system|>`:
    a user rewriting the system prompt) is tokenized as characters, never as that token. Chats
    whose contents spell none tokenize exactly as the whole rendered string (as transformers)."""
    specials = tuple(getattr(session, "special_tokens", ()) or ())
    if not any(s in str(m.get("content", "")) for m in messages for s in specials):
        return session.tokenize(session.render_chat(messages), add_special_tokens=False)
    return _chat_ids_contents_as_text(session, messages, specials)


def _chat_ids_contents_as_text(session: Session, messages: list[dict[str, str]],
                               specials: tuple[str, ...]) -> list[int]:
    """The template rendered around placeholders: its own text tokenized as usual (its
    markers are control tokens), each content tokenized with every control-token spelling
    split so that it cannot match."""
    import re
    import secrets

    tag = secrets.token_hex(8)
    marks = [f"PHIKIT{tag}CONTENT{i}END" for i in range(len(messages))]
    rendered = session.render_chat([{**m, "content": mark} for m, mark in zip(messages, marks)])
    lead = session.tokenize("", add_special_tokens=False)  # what a runtime prepends to any text

    def pieces(text: str) -> list[int]:
        ids = session.tokenize(text, add_special_tokens=False) if text else []
        return ids[len(lead):] if lead and ids[:len(lead)] == lead else ids

    spelled = re.compile("|".join(re.escape(s) for s in specials))
    out: list[int] = list(lead)
    position = 0
    found = sorted((rendered.find(mark), i) for i, mark in enumerate(marks)
                   if rendered.find(mark) >= 0)
    for start, i in found:
        out += pieces(rendered[position:start])
        content, last = str(messages[i].get("content", "")), 0
        for hit in spelled.finditer(content):
            out += pieces(content[last:hit.start()])
            token = hit.group(0)
            out += pieces(token[:1]) + pieces(token[1:])  # "<" + "|end|>": text, not a token
            last = hit.end()
        out += pieces(content[last:])
        position = start + len(marks[i])
    return out + pieces(rendered[position:])


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
