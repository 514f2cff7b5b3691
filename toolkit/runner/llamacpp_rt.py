"""Runtime module: llama.cpp through llama-cpp-python (one GGUF file). Imports only llama_cpp,
numpy and jinja2 (which llama-cpp-python itself depends on).

Copied into bundles beside core.py. Options:
  threads: int | "auto"        llama.cpp threads for decode and batch (auto = the device's cores)
  context_length: int | None   KV cache size; default: the model's training context
  extra_buffer_types: "auto" | true | false
                               llama.cpp's extra weight buffer types (the CPU repack of Q4_0 for
                               AVX2/NEON, and AMX where llama.cpp was compiled with it). "auto":
                               off on CPUs with AMX, whose buffer type crashes llama_decode
                               (ggml-org/llama.cpp#20824, ollama/ollama#17205), on elsewhere.

Prompt tokenization follows transformers, not llama.cpp's defaults, because that is what the
model was trained on: Phi-3's special tokens carry `rstrip: true` in tokenizer.json (transformers
drops the whitespace after them: "<|user|>\\nHi" -> [<|user|>, "▁Hi"]) and llama.cpp ignores the
flag ([<|user|>, "▁", "\\n", "Hi"]). The runner removes that whitespace before llama.cpp tokenizes,
reading the flags from the tokenizer.json shipped beside the GGUF; the bundle's Modelfile renders
chat prompts without it for the same reason, so Ollama feeds the model the same ids.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import llama_cpp
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .core import (AUTO, HostRule, HostTable, auto_threads, check_constraint, check_length,
                   generation_eos, host_cpu, stop_ids)
from .guidance import MECHANISM, mask_for

AMX_CRASH = ("llama.cpp's AMX buffer type crashes llama_decode on AMX CPUs "
             "(ggml-org/llama.cpp#20824, ollama/ollama#17205); extra_buffer_types: false avoids it")


# llama.cpp's options whose best value depends on the CPU
HOST_TABLE = HostTable(
    choices={"extra_buffer_types": (True, False)},
    rows=(HostRule("extra_buffer_types", False, "off: AMX's buffer type crashes llama_decode "
                   "(ggml-org/llama.cpp#20824)", classes=("amx",), protects=True),
          HostRule("extra_buffer_types", True, "on: the weight repack for this CPU's kernels")))


def extra_buffer_types(option: Any, cpu: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(use llama.cpp's extra buffer types?, what is in force and why) for the option and this
    CPU. The option also takes the strings a command line passes ("on", "0", ...)."""
    if isinstance(option, str) and option.strip().lower() != AUTO:
        option = option.strip().lower() in ("1", "true", "on", "yes")
    options, in_force = HOST_TABLE.choose({"extra_buffer_types": option}, cpu)
    return options["extra_buffer_types"], in_force["extra_buffer_types"]


PORTABLE_BUILD = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
                  "-DGGML_F16C=ON -DGGML_BMI2=ON' pip install --force-reinstall --no-binary "
                  "llama-cpp-python llama-cpp-python==" + llama_cpp.__version__)


def compiled_cpu_features() -> tuple[list[str], str]:
    """(the CPU features this llama.cpp was compiled to use, how to build it for any AVX2 CPU).
    llama-cpp-python compiles from source with -march=native by default: its kernels then
    need the build machine's instructions (AVX-512 on one machine), and another CPU stops with
    SIGILL. llama.cpp reports the features compiled in ("CPU : AVX2 = 1 | AVX512 = 1 | ...")."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    found = re.findall(r"([A-Z][A-Z0-9_]*) = 1", info.partition("CPU :")[2] or info)
    return [f.lower() for f in found], PORTABLE_BUILD


# The module whose llama_model_default_params() Llama.__init__ calls: llama.py imports the ctypes
# bindings as its own global `llama_cpp`, which is not the top-level package of the same name.
# Read from the constructor's globals, so it is the object Llama reads in any bindings version.
_LLAMA_DEFAULTS = llama_cpp.Llama.__init__.__globals__["llama_cpp"]
# where llama.cpp puts the weights when no extra buffer type takes them (mmap'd or read in)
PLAIN_WEIGHT_BUFFERS = ("CPU", "CPU_Mapped")
_WEIGHT_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=\s*([\d.]+) MiB")


@contextlib.contextmanager
def _model_defaults(use_extra_bufts: bool) -> Iterator[None]:
    """llama_model_default_params() with use_extra_bufts set, while Llama's constructor runs:
    the constructor takes no such argument (llama.cpp's --no-repack) and fills its
    llama_model_params from that function."""
    default = _LLAMA_DEFAULTS.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = use_extra_bufts
        return p

    _LLAMA_DEFAULTS.llama_model_default_params = params
    try:
        yield
    finally:
        _LLAMA_DEFAULTS.llama_model_default_params = default


@contextlib.contextmanager
def _load_log(lines: list[str]) -> Iterator[None]:
    """llama.cpp's (and ggml's) log lines into `lines` while the model loads, whatever
    verbose says; llama-cpp-python's own log callback is put back afterwards."""
    @_LLAMA_DEFAULTS.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    _LLAMA_DEFAULTS.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        from llama_cpp import _logger
        _LLAMA_DEFAULTS.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def weight_buffers(log: Sequence[str]) -> dict[str, float]:
    """{buffer type: MiB} of the model's weights, from llama.cpp's load log
    ("load_tensors:  AMX model buffer size = 5.10 MiB")."""
    found: dict[str, float] = {}
    for name, mib in _WEIGHT_BUFFER.findall("".join(log)):
        found[name] = found.get(name, 0.0) + float(mib)
    return found


def _load(path: Path, use_extra_bufts: bool, **kwargs) -> tuple[llama_cpp.Llama, dict[str, float]]:
    """(llama_cpp.Llama loaded with use_extra_bufts, {buffer type: MiB} holding its weights).
    What llama.cpp received and where it put the weights are both checked: a protection that
    did not reach llama.cpp (a bindings version that fills its parameters another way) stops
    the load here rather than the process later."""
    log: list[str] = []
    with _load_log(log), _model_defaults(use_extra_bufts):
        llm = llama_cpp.Llama(str(path), **kwargs)
    buffers = weight_buffers(log)
    extra = sorted(set(buffers) - set(PLAIN_WEIGHT_BUFFERS))
    if bool(llm.model_params.use_extra_bufts) != use_extra_bufts or (
            not use_extra_bufts and extra):
        llm.close()
        raise RuntimeError(
            f"llama-cpp-python {llama_cpp.__version__} did not apply use_extra_bufts="
            f"{use_extra_bufts} (it loaded with {bool(llm.model_params.use_extra_bufts)}; weights "
            f"in {', '.join(buffers) or 'no buffer named in its log'}): refusing to run a model "
            "whose load is not what was asked")
    return llm, buffers


def load_llama(path: Path, option: Any = AUTO, **kwargs) -> llama_cpp.Llama:
    """llama_cpp.Llama(path, **kwargs) with the extra buffer types this CPU gets from `option`,
    as a session loads it: what a benchmark's bare llama-cpp-python loop compares against (on an
    AMX CPU llama-cpp-python's own default crashes, so there is no unprotected baseline)."""
    return _load(path, extra_buffer_types(option, host_cpu())[0], **kwargs)[0]


def _strip_patterns(model_dir: Path) -> list[tuple[re.Pattern, str]]:
    """Regexes that drop the whitespace transformers strips around rstrip/lstrip special tokens
    (one alternation per side, so a prompt is scanned twice, not once per special token)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return []
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    rstrip = "|".join(re.escape(t["content"]) for t in added if t.get("rstrip"))
    lstrip = "|".join(re.escape(t["content"]) for t in added if t.get("lstrip"))
    out = []
    if rstrip:
        out.append((re.compile(f"({rstrip})\\s+"), r"\1"))
    if lstrip:
        out.append((re.compile(f"\\s+({lstrip})"), r"\1"))
    return out


class LlamaCppSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        files = sorted(model_dir.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{model_dir}: expected exactly one .gguf file, found {len(files)}")
        threads = auto_threads(options.get("threads"))
        # n_ctx 0 = the model's training context (llama.cpp's convention)
        n_ctx = int(options.get("context_length") or 0)
        cpu = host_cpu()
        self.extra_bufts, self.extra_bufts_why = extra_buffer_types(
            options.get("extra_buffer_types", "auto"), cpu)
        # what a crash of this process most likely is, for the parent's one-line error
        self.known_crash = AMX_CRASH if self.extra_bufts and cpu["class"] == "amx" else None
        self.llm, self.weight_buffers = _load(files[0], self.extra_bufts, n_ctx=n_ctx,
                                              n_batch=512, n_threads=threads,
                                              n_threads_batch=threads, verbose=False)
        self.context_length = self.llm.n_ctx()
        self.meta = self.llm.metadata
        self.threads = threads
        self.file = files[0]
        self.n_vocab = self.llm.n_vocab()
        self.eos_token_ids = self._eos_ids(model_dir)
        # llama.cpp's own GBNF from a JSON Schema leaves out numeric bounds (minimum/maximum),
        # so a schema would hold only sometimes: llguidance's mask over the logits instead
        self.guidance = mask_for(model_dir, self.eos_token_ids, self.n_vocab)
        self.constrains = MECHANISM if self.guidance else None
        self.strip = _strip_patterns(model_dir)
        template = self.meta.get("tokenizer.chat_template")
        # compiled once; transformers renders chat templates with these Jinja settings
        self.template = template and ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True).from_string(template)
        self.special = {"bos_token": self.detokenize_special(self.llm.token_bos()),
                        "eos_token": self.detokenize_special(self.llm.token_eos())}

    def _eos_ids(self, model_dir: Path) -> tuple[int, ...]:
        eos = generation_eos(model_dir)
        if eos:
            return eos
        # llama.cpp's own end-of-generation set (Phi-3: <|endoftext|>, <|end|>, ...)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        for pattern, repl in self.strip:
            text = pattern.sub(repl, text)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize([int(t) for t in ids]).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.template:
            raise ValueError(f"{self.file.name} carries no chat template (tokenizer.chat_template)")
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)

    def detokenize_special(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _restart(self) -> None:
        """Forget the KV cache (llama-cpp-python would otherwise reuse a matching prefix)."""
        self.llm.reset()
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    def logits(self, ids: Sequence[int], start: int = 0) -> np.ndarray:
        """Teacher-forced logits, batch by batch. The Llama object is made without logits_all
        (its score buffer would hold n_ctx x vocab floats: 0.5 GB at 4k context), so each batch
        asks llama.cpp for the logits of its positions from `start` on, and no others: llama.cpp
        then skips the output projection of the rest."""
        check_length(len(ids), self.context_length)
        self._restart()
        out = np.empty((len(ids) - start, self.n_vocab), dtype=np.float32)
        llm = self.llm
        for first in range(0, len(ids), llm.n_batch):
            batch = list(ids[first:first + llm.n_batch])
            llm._batch.set_batch(batch=batch, n_past=first, logits_all=True)
            wanted = [first + i >= start for i in range(len(batch))]
            for i, flag in enumerate(wanted):
                llm._batch.batch.logits[i] = flag
            llm._ctx.decode(llm._batch)
            if n := sum(wanted):  # llama.cpp packs the requested rows in batch order
                row = max(first, start) - start
                out[row:row + n] = np.ctypeslib.as_array(
                    llm._ctx.get_logits(), shape=(n * self.n_vocab,)).reshape(n, self.n_vocab)
        self._restart()
        return out

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        check_constraint(self, sampling)
        state = self.guidance.start(sampling.constraint) if sampling.constraint else None
        self._restart()
        if sampling.seed is not None:
            self.llm.set_seed(int(sampling.seed))
        stop = stop_ids(self, sampling)
        max_new = max(1, min(sampling.max_new_tokens, self.context_length - len(ids)))
        greedy = sampling.temperature <= 0
        tokens = self.llm.generate(list(ids), temp=sampling.temperature,
                                   top_k=1 if greedy else (sampling.top_k or 0),
                                   top_p=1.0 if greedy else sampling.top_p, min_p=0.0,
                                   repeat_penalty=1.0, reset=True,
                                   logits_processor=state and llama_cpp.LogitsProcessorList([
                                       lambda seen, logits: state.masked(logits, seen[len(ids):])]))
        for n, token in enumerate(tokens):
            token = int(token)
            if token in stop:
                return
            yield token
            if n + 1 >= max_new:
                return

    def info(self) -> dict[str, Any]:
        file_type = self.meta.get("general.file_type")
        return {"runtime": "llama.cpp (llama-cpp-python)", "version": llama_cpp.__version__,
                "file": self.file.name, "file_type": file_type, "threads": self.threads,
                "context_length": self.context_length,
                "options_in_force": {"extra_buffer_types": self.extra_bufts_why},
                "weight_buffers": self.weight_buffers,
                "system": llama_cpp.llama_print_system_info().decode().strip()}


def open_session(model_dir: Path, options: dict[str, Any]) -> LlamaCppSession:
    return LlamaCppSession(model_dir, options)
