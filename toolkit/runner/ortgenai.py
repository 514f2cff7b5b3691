"""Runtime module: ONNX Runtime GenAI (og.Model / og.Generator). Imports only that runtime, numpy
and `tokenizers` (hf_tokens.py: the model's own tokenizer, so ids are exactly the reference's).

Copied into bundles beside core.py. Options (from the bundle manifest or the caller):
  threads: int | "auto"       intra-op threads (ORT GenAI ran on ONE thread by default on
                              2-core Linux: setting it doubles decode speed)
  execution_provider: "cpu" | "cuda" | ...   (default: the one genai_config.json names)
  provider_options: dict      passed to that provider
  allow_spinning: true | false | "auto"   whether ONNX Runtime's intra-op threads spin while
                              they wait for work (session.intra_op.allow_spinning); "auto":
                              decided for this CPU by HOST_TABLE

Teacher-forced logits (validation) of a graph whose lm_head the builder pruned to the last
position come from the all-logits graph the onnx backend writes beside it (all_logits_file: the
same nodes and weights, the lm_head over every position) in one prefill; without that file, one
token at a time through the decode path. Both graphs are held while two copies fit in memory
(core.one_copy_at_a_time), else one at a time.

A model built for another provider (cuda) whose provider cannot start here (no GPU, no CUDA
build of the runtime) runs on the CPU execution provider when that can run the same graph
(ONNX Runtime's CPU kernels take the fp16 graphs the builder writes for cuda); info() then says
which provider produced the figures. When the CPU provider cannot run it either, opening fails
with "needs CUDA" and both reasons.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# core first: its quiet_runtimes() runs before the runtime initializes (no telemetry)
from .core import (DEFAULT_CONTEXT, HostTable, auto_threads, check_constraint, check_length,
                   one_copy_at_a_time, stop_ids)
from .hf_tokens import HfTokenizer
import onnxruntime_genai as og

# core.quiet_runtimes() (imported above) already set ORT_DISABLE_TELEMETRY before the import;
# the API call covers an older onnxruntime-genai that does not read it
if hasattr(og, "disable_telemetry_events"):
    og.disable_telemetry_events()

# Providers that share the CPU EP's config name in genai_config.json.
_CPU = {"cpu", "CPUExecutionProvider"}

# ONNX Runtime's options whose best value depends on the CPU (the CPU execution provider's);
# MatMulNBits' accuracy level is a graph attribute, chosen at build time by the target.
HOST_TABLE = HostTable(choices={"allow_spinning": (True, False)}, rows=(),
                       runtime_defaults={"allow_spinning": True})


def all_logits_file(decoder: str) -> str:
    """The graph beside decoder `decoder` (genai_config's filename) whose lm_head covers every
    position, for teacher-forced logits."""
    return f"{Path(decoder).stem}.all-logits.onnx"


def _config_provider(genai: dict[str, Any]) -> str:
    """The provider genai_config.json names (the builder's `-e`), "cpu" when it names none."""
    options = genai["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    return next(iter(options[0]), "cpu") if options else "cpu"


def _first_line(error: BaseException) -> str:
    """The error's first line, absolute paths cut to their file names (notes stay readable)."""
    text = str(error).strip()
    return re.sub(r"(?:/[^\s/:]+)+/([^\s/:]+)", r"\1", text.splitlines()[0]) if text \
        else type(error).__name__


def load_model(model_dir: Path, threads: int, provider: str,
               provider_options: dict[str, Any] | None = None,
               config_entries: dict[str, str] | None = None,
               decoder_file: str | None = None) -> tuple[Any, str, str | None]:
    """(og.Model, the provider it runs on, why the requested provider did not start or None).
    decoder_file: another graph of the same decoder, in place of genai_config's.

    ORT GenAI raises RuntimeError from og.Model when a provider cannot start (without the CUDA
    build: "Cuda interface not available: Failed to load library ..."; with it but no GPU, a
    CUDA error); the same graph is then tried on the CPU execution provider."""
    def config(on: str):
        cfg = og.Config(str(model_dir))
        # keys it does not know, ORT GenAI passes on as session config entries
        decoder: dict[str, Any] = {"session_options": {
            "intra_op_num_threads": threads, **(config_entries or {})}}
        if decoder_file:
            decoder["filename"] = decoder_file
        cfg.overlay(json.dumps({"model": {"decoder": decoder}}))
        cfg.clear_providers()  # no provider appended = the CPU execution provider
        if on not in _CPU:
            cfg.append_provider(on)
            for key, value in (provider_options or {}).items():
                cfg.set_provider_option(on, key, str(value))
        return cfg

    if provider in _CPU:
        return og.Model(config(provider)), "cpu", None
    try:
        return og.Model(config(provider)), provider, None
    except RuntimeError as e:
        reason = _first_line(e)
    try:
        model = og.Model(config("cpu"))
    except RuntimeError as e:
        raise RuntimeError(
            f"needs {provider.upper()}: the {provider} execution provider does not start here "
            f"({reason}) and the CPU execution provider cannot run this graph "
            f"({_first_line(e)}); run it on a machine with the {provider} provider") from None
    print(f"[phikit] ONNX Runtime GenAI execution provider {provider} not available here "
          f"({reason}); running the same graph on the CPU execution provider", file=sys.stderr)
    return model, "cpu", reason


class OrtGenaiSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        self.model_dir = model_dir
        genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        threads = auto_threads(options.get("threads"))
        self.requested_provider = options.get("execution_provider") or _config_provider(genai)
        options, self.options_in_force = HOST_TABLE.choose(options)
        entries = {} if options["allow_spinning"] is None else {
            "session.intra_op.allow_spinning": "1" if options["allow_spinning"] else "0"}
        self._load = lambda decoder_file=None: load_model(
            model_dir, threads, self.requested_provider, options.get("provider_options"),
            entries, decoder_file)
        self.model, self.provider, self.fallback_reason = self._load()
        decoder = genai["model"]["decoder"].get("filename")
        full = model_dir / all_logits_file(decoder) if decoder else None
        self.all_logits_graph = full.name if full and full.is_file() else None
        self.all_logits_model = None
        weights = sum(p.stat().st_size for p in model_dir.glob("*.onnx*") if p.is_file())
        self.one_copy = one_copy_at_a_time(None, weights)
        self.threads = threads
        self.tokenizer = og.Tokenizer(self.model)  # its chat template only
        self.hf_tokenizer = HfTokenizer(model_dir)  # the ids the model was trained on
        eos = genai["model"].get("eos_token_id", [])
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [eos])
        self.context_length = int(genai["model"].get("context_length", DEFAULT_CONTEXT))
        self.vocab_size = int(genai["model"].get("vocab_size", 0))
        self.pruned_lm_head = False  # set when the graph returns only the last position
        # ORT GenAI's own guidance (GeneratorParams.set_guidance: llguidance inside)
        self.constrains = ("onnxruntime-genai guidance"
                           if hasattr(og.GeneratorParams, "set_guidance") else None)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf_tokenizer.tokenize(text, add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.detokenize(ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(json.dumps(messages),
                                                  add_generation_prompt=True)

    def _generator(self, max_length: int, sampling=None, model=None) -> og.Generator:
        model = model or self._generation_model()
        params = og.GeneratorParams(model)
        search: dict[str, Any] = {"max_length": max_length, "do_sample": False}
        if sampling is not None and sampling.temperature > 0:
            search.update(do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k or 0)
            if sampling.seed is not None:
                search["random_seed"] = int(sampling.seed)
        params.set_search_options(**search)
        if sampling is None or sampling.constraint is None:
            return og.Generator(model, params)
        try:  # a build without guidance refuses here; a bad schema at og.Generator
            params.set_guidance("json_schema", sampling.constraint.schema_text())
            return og.Generator(model, params)
        except RuntimeError as e:
            raise ValueError(f"the schema cannot be enforced: {_first_line(e)}") from None

    def _generation_model(self):
        if self.model is None:
            self.all_logits_model = None  # one copy at a time: freed before the other loads
            self.model = self._load()[0]
        return self.model

    def _all_logits_model(self):
        if self.all_logits_model is None:
            if self.one_copy:
                self.model = None
            self.all_logits_model = self._load(self.all_logits_graph)[0]
        return self.all_logits_model

    def logits(self, ids: Sequence[int], start: int = 0) -> np.ndarray:
        check_length(len(ids), self.context_length)
        # room for the tokens only, never past the KV cache: a text as long as the context
        # (an eval row that reaches it) is a valid input
        room = min(len(ids) + 1, self.context_length)
        if self.all_logits_graph:
            gen = self._generator(room, model=self._all_logits_model())
            gen.append_tokens(np.asarray([ids], dtype=np.int32))
            return np.asarray(gen.get_output("logits"), dtype=np.float32)[0, start:]
        if not self.pruned_lm_head:
            gen = self._generator(room)
            gen.append_tokens(np.asarray([ids], dtype=np.int32))
            out = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
            if out.shape[0] == len(ids):
                return out[start:]
            self.pruned_lm_head = True  # learnt once; later calls skip the wasted prefill
        # The graph's lm_head is pruned to the last position and no all-logits graph is beside
        # it (a bundle built before phikit wrote one, or a graph from elsewhere). Every
        # position's logits come through the decode path, one token at a time: the positions before
        # `start` too, so that a check of generation (which prefills the prompt at once)
        # against these logits still compares two different paths.
        gen = self._generator(room)
        rows = []
        for i, token in enumerate(ids):
            gen.append_tokens(np.asarray([[token]], dtype=np.int32))
            if i >= start:
                rows.append(np.asarray(gen.get_output("logits"), dtype=np.float32)[0, -1])
        return np.stack(rows)

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        check_constraint(self, sampling)
        max_length = min(self.context_length, len(ids) + sampling.max_new_tokens)
        gen = self._generator(max_length, sampling)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        stop = stop_ids(self, sampling)
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if token in stop:
                return
            yield token

    def info(self) -> dict[str, Any]:
        notes = [] if self.fallback_reason is None else [
            f"built for {self.requested_provider}; the {self.requested_provider} execution "
            f"provider does not start here ({self.fallback_reason}): figures measured with the "
            "CPU execution provider on the same graph"]
        return {"runtime": "onnxruntime-genai", "version": og.__version__,
                "execution_provider": self.provider,
                "requested_execution_provider": self.requested_provider,
                "threads": self.threads, "options_in_force": self.options_in_force,
                "context_length": self.context_length, "notes": notes}


def open_session(model_dir: Path, options: dict[str, Any]) -> OrtGenaiSession:
    return OrtGenaiSession(model_dir, options)
