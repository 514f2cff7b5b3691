"""Runtime module: OpenVINO (openvino_genai.LLMPipeline + the compiled IR for logits).

Copied into bundles beside core.py; imports only openvino, openvino_genai and numpy.
Options:
  device: "CPU" | "GPU" | "NPU" (falls back to CPU with a visible message when absent)
  threads: int | "auto"
  inference_precision, kv_cache_precision, dynamic_quantization_group_size: the CPU plugin's
             INFERENCE_PRECISION_HINT, KV_CACHE_PRECISION and DYNAMIC_QUANTIZATION_GROUP_SIZE
             (0: activations stay floating point). "auto" (the default) on the CPU: decided for
             this CPU by HOST_TABLE; info() reports what the compiled model executes.
  inference_precision: e.g. "f32" / "f16" (INFERENCE_PRECISION_HINT) for `device`. When that
             device is absent and the session falls back to CPU, a lower-than-f32 hint is NOT
             passed on: it was chosen for the GPU, and the CPU plugin honours f16 only where the
             CPU computes fp16 natively (AVX512-FP16), where LLMPipeline then generated token 0
             for most prompts of the intel-gpu bundle. The CPU runs at its own default (what the
             intel-cpu bundle validates), and info() reports the precision it executed.
  one_compiled_copy: true | false | "auto"   LLMPipeline compiles the IR for generation and
             logits() compiles it again: two copies of the weights in process memory, which
             validation of a model near the machine's memory cannot afford. true keeps one at a time (the other
             is dropped and compiled again when next needed); auto (the default): true when two
             copies, at 1.3x the weight file each, would take more than half the memory
             available at load (validation should leave the machine room to work)
  cache_dir: compiled-model cache (CACHE_DIR). A relative one lives under the user's cache
             ($XDG_CACHE_HOME or ~/.cache)/phikit/openvino/<graph sha256>, never in the bundle:
             every file of a bundle is verified, and a cache is this machine's
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# core first: its quiet_runtimes() runs before the runtime initializes (no telemetry)
from .core import (AUTO, DEFAULT_CONTEXT, HostRule, HostTable, check_constraint, check_length,
                   one_copy_at_a_time, stop_ids, thread_count)
from .guidance import MECHANISM, mask_for, pick
import openvino as ov
import openvino_genai as ovg


REQUIRED = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
            "openvino_detokenizer.xml")

# The CPU plugin's options whose best value depends on the CPU; keys are the runtime options,
# PROPERTIES their OpenVINO property names. Rows say why; an option with no row that applies
# stays at the plugin's own default (which itself differs per CPU and per OpenVINO version).
HOST_TABLE = HostTable(
    choices={"inference_precision": ("f32", "bf16", "f16"),
             "kv_cache_precision": ("u8", "f16", "bf16", "f32"),
             "dynamic_quantization_group_size": (0, 32, 64, 128)},
    rows=(HostRule("inference_precision", "bf16", "f16 gave wrong tokens on CPUs that compute "
                   "fp16 natively (token 0 for most prompts); bf16 is the plugin's own choice "
                   "there", features=("avx512_fp16",), protects=True),))
PROPERTIES = {"inference_precision": "INFERENCE_PRECISION_HINT",
              "kv_cache_precision": "KV_CACHE_PRECISION",
              "dynamic_quantization_group_size": "DYNAMIC_QUANTIZATION_GROUP_SIZE"}


def _cache_dir(model_dir: Path, option: str) -> Path:
    path = Path(option)
    if path.is_absolute():
        return path
    import hashlib

    # keyed by the model's graph, so a staged bundle and the same bundle published (or copied)
    # share one cache rather than growing one per path
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256((model_dir / "openvino_model.xml").read_bytes()).hexdigest()[:16]
    return base / "phikit" / "openvino" / key / path


def _device(core: ov.Core, wanted: str) -> str:
    if wanted == "CPU" or wanted in core.available_devices:
        return wanted
    print(f"[phikit] OpenVINO device {wanted} not available here "
          f"(have: {', '.join(core.available_devices)}); falling back to CPU", file=sys.stderr)
    return "CPU"


def ir_inputs(names: set[str], feed: Sequence[int], past: int) -> dict[str, np.ndarray]:
    """One infer call's inputs to a stateful decoder IR: `feed` after `past` tokens already in
    its KV cache (the inputs the export has: position_ids and beam_idx are optional)."""
    inputs = {"input_ids": np.asarray([feed], dtype=np.int64),
              "attention_mask": np.ones((1, past + len(feed)), dtype=np.int64)}
    if "position_ids" in names:
        inputs["position_ids"] = np.arange(past, past + len(feed), dtype=np.int64)[None]
    if "beam_idx" in names:
        inputs["beam_idx"] = np.zeros(1, dtype=np.int32)
    return inputs

class _Queue(ovg.StreamerBase):
    """Token ids from LLMPipeline's worker into a queue the caller iterates; `cancel` stops it
    (a server client that went away must free the model)."""

    def __init__(self, q: queue.Queue, cancel: threading.Event):
        super().__init__()
        self.q, self.cancel = q, cancel

    def write(self, token) -> ovg.StreamingStatus:
        for t in token if isinstance(token, (list, tuple)) else [token]:
            self.q.put(int(t))
        return ovg.StreamingStatus.STOP if self.cancel.is_set() else ovg.StreamingStatus.RUNNING

    def end(self) -> None:
        pass


class OpenVinoSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        missing = [f for f in REQUIRED if not (model_dir / f).is_file()]
        if missing:
            raise ValueError(f"{model_dir}: not an OpenVINO LLM directory (missing "
                             f"{', '.join(missing)})")
        self.model_dir = model_dir
        core = ov.Core()
        self.requested_device = str(options.get("device", "CPU")).upper()
        self.device = _device(core, self.requested_device)
        props: dict[str, Any] = {}
        threads = thread_count(options.get("threads"))
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.notes: list[str] = []
        hint = options.get("inference_precision")
        if hint and self.device != self.requested_device and str(hint).lower() != "f32":
            self.notes.append(f"the target's inference_precision {hint} is for "
                              f"{self.requested_device}; on the {self.device} fallback the "
                              "precision was chosen for this CPU (see options_in_force)")
            options = {**options, "inference_precision": AUTO}
        self.options_in_force: dict[str, Any] = {}
        if self.device == "CPU":
            options, self.options_in_force = HOST_TABLE.choose(options)
        for option, prop in PROPERTIES.items():
            if options.get(option) not in (None, AUTO):
                props[prop] = options[option]
        if options.get("cache_dir"):
            props["CACHE_DIR"] = str(_cache_dir(model_dir, options["cache_dir"]))
        self.props = props
        self.one_copy = one_copy_at_a_time(options.get("one_compiled_copy"),
                                           (model_dir / "openvino_model.bin").stat().st_size)
        self.pipe = ovg.LLMPipeline(str(model_dir), self.device, **props)
        self.tokenizer = self.pipe.get_tokenizer()
        # LLMPipeline compiles the IR for generation; teacher-forced logits need a plain infer
        # request, compiled only when logits() is first called (a device that only generates
        # or serves never pays for a second compiled copy).
        self.core, self.ir = core, core.read_model(str(model_dir / "openvino_model.xml"))
        self.request = self.compiled = None
        gen = self.pipe.get_generation_config()
        self.eos_token_ids = tuple(sorted(gen.stop_token_ids or {gen.eos_token_id}))
        config = json.loads((model_dir / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings", DEFAULT_CONTEXT))
        # Not openvino_genai's structured output: its XGrammar vocabulary reads byte-fallback
        # tokens (Phi-3's <0x0A>) as their literal spelling, so it let raw newlines into JSON
        # strings. Constrained requests decode through the IR with llguidance's mask instead.
        self.guidance = mask_for(model_dir, self.eos_token_ids, int(config["vocab_size"]))
        self.constrains = MECHANISM if self.guidance else None
        vocab = self.ir.output("logits").get_partial_shape()[-1]
        if vocab.is_static and config.get("vocab_size") not in (None, vocab.get_length()):
            raise ValueError(f"config.json says vocab_size {config['vocab_size']} but the IR's "
                             f"logits have {vocab.get_length()}: config and model do not match")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [int(t) for t in out.input_ids.data[0]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def logits(self, ids: Sequence[int], start: int = 0) -> np.ndarray:
        check_length(len(ids), self.context_length)
        if self.request is None:
            compiled = self._compiled()
            self.request, self.logits_port = (compiled.create_infer_request(),
                                              compiled.output("logits"))
            self.input_names = {i.get_any_name() for i in compiled.inputs}
        inputs = ir_inputs(self.input_names, ids, 0)
        self.request.reset_state()  # stateful IR: the KV cache lives in the request
        # shared: the output is the request's own tensor, rewritten by its next infer, so only
        # the rows asked for are copied out of it
        out = self.request.infer(inputs, share_inputs=True, share_outputs=True)
        return np.array(out[self.logits_port][0, start:], dtype=np.float32)

    def _constrained(self, ids: Sequence[int], sampling) -> Iterator[int]:
        """Generation through the compiled IR's own infer request (its KV cache is the request's
        state), one token at a time, each sampled from llguidance's masked logits."""
        state = self.guidance.start(sampling.constraint)
        compiled = self._compiled()
        request, port = compiled.create_infer_request(), compiled.output("logits")
        names = {i.get_any_name() for i in compiled.inputs}
        rng = np.random.default_rng(sampling.seed)
        stop, generated, feed = stop_ids(self, sampling), [], list(ids)
        for _ in range(max(1, min(sampling.max_new_tokens, self.context_length - len(ids)))):
            inputs = ir_inputs(names, feed, len(ids) + len(generated) - len(feed))
            logits = np.array(request.infer(inputs)[port][0, -1], dtype=np.float32)
            token = pick(state.masked(logits, generated), sampling, rng)
            if token in stop:
                return
            yield token
            generated.append(token)
            feed = [token]

    def _compiled(self):
        if self.compiled is None:
            if self.one_copy:
                self.pipe = None  # LLMPipeline's compiled copy goes before this one is made
            self.compiled = self.core.compile_model(self.ir, self.device, self.props)
        return self.compiled

    def executed_precision(self) -> dict[str, str]:
        """What the plugin compiled the IR to compute in, asked of the compiled model (not
        assumed from the hint): the hint is honoured only where the device supports it."""
        out = {}
        for key, name in (("INFERENCE_PRECISION_HINT", "inference"),
                          ("KV_CACHE_PRECISION", "kv_cache"),
                          ("DYNAMIC_QUANTIZATION_GROUP_SIZE", "dynamic_quantization_group_size")):
            try:
                value = self._compiled().get_property(key)
                out[name] = value.to_string() if hasattr(value, "to_string") else str(value)
            except RuntimeError:  # property unknown to this plugin / version
                pass
        return out

    def _pipeline(self) -> ovg.LLMPipeline:
        if self.pipe is None:
            self.pipe = ovg.LLMPipeline(str(self.model_dir), self.device, **self.props)
        return self.pipe

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        check_constraint(self, sampling)
        if sampling.constraint is not None:
            yield from self._constrained(ids, sampling)
            return
        if self.one_copy:  # the port, too, holds the compiled model
            self.request = self.compiled = self.logits_port = None
        pipe = self._pipeline()
        config = pipe.get_generation_config()
        config.max_new_tokens = max(1, min(sampling.max_new_tokens,
                                           self.context_length - len(ids)))
        config.do_sample = sampling.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = sampling.temperature, sampling.top_p
            config.top_k = sampling.top_k or 0
            if sampling.seed is not None:
                config.rng_seed = int(sampling.seed)
        stop = stop_ids(self, sampling)
        arr = np.asarray([ids], dtype=np.int64)
        inputs = ovg.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))
        q: queue.Queue = queue.Queue()
        done, cancel = object(), threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                pipe.generate(inputs, config, _Queue(q, cancel))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
            finally:
                q.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (token := q.get()) is not done:
                if token in stop:
                    cancel.set()
                    continue
                if not cancel.is_set():
                    yield token
        finally:
            cancel.set()  # also when the caller stops iterating early
            worker.join()
        if errors:
            raise errors[0]

    def info(self) -> dict[str, Any]:
        notes = [] if self.device == self.requested_device else [
            f"measured on {self.device}: the target's {self.requested_device} is not present on "
            f"this machine; the same model files ran on {self.device}, so nothing here says how "
            f"{self.requested_device} computes them"]
        return {"runtime": "openvino", "version": ov.__version__, "device": self.device,
                "requested_device": self.requested_device,
                "properties": self.props, "options_in_force": self.options_in_force,
                "one_compiled_copy": self.one_copy,
                "executed_precision": self.executed_precision(),
                "context_length": self.context_length, "notes": notes + self.notes}


def open_session(model_dir: Path, options: dict[str, Any]) -> OpenVinoSession:
    return OpenVinoSession(model_dir, options)
