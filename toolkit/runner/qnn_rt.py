"""Runtime module: Qualcomm QNN (Hexagon NPU) through ONNX Runtime's QNN execution provider.

Copied into bundles beside core.py; imports only onnxruntime, onnxruntime_qnn (the QNN EP plugin
and its HTP backend library), tokenizers, jinja2 and numpy.

The model is Olive's static pipeline (qnn_pipeline.json lists it): an embeddings graph, N
transformer slices in two fixed-shape forms - `context_k` (a prefill chunk of `chunk` tokens) and
`iterator_k` (one token) - both over a KV cache of `context_length` positions passed in and out,
then an lm_head graph. Shapes are static because the HTP compiles fixed graphs.

Options:
  execution_provider: "qnn" (default) | "cpu"   cpu runs the same graphs on ONNX Runtime's CPU EP
  backend: "htp" (default)                       the QNN backend library (libQnnHtp / QnnHtp.dll);
                                                 on x86_64 Linux it is Qualcomm's HTP simulator
  cpu_fallback: false (default)                  false: every node must run on QNN, or opening the
                                                 model fails naming the nodes that cannot
  provider_options: {...}                        passed to the QNN EP (htp_performance_mode, ...)
  threads: int | "auto"                          CPU threads (the simulator, the CPU EP)
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# core first: its quiet_runtimes() runs before the runtime initializes (no telemetry)
from .core import auto_threads, check_constraint, check_length, generation_eos, stop_ids
from .hf_tokens import HfTokenizer
import onnxruntime as ort
from jinja2.sandbox import ImmutableSandboxedEnvironment


PIPELINE = "qnn_pipeline.json"
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_registered = False


def _register_qnn() -> list:
    """The QNN EP ships as a plugin library (onnxruntime-qnn); register it once per process."""
    global _registered
    import onnxruntime_qnn

    if not _registered:
        ort.register_execution_provider_library("QNNExecutionProvider",
                                                onnxruntime_qnn.get_library_path())
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise RuntimeError("the QNN execution provider registered no device")
    return devices


def _backend_path(name: str) -> str:
    import onnxruntime_qnn

    if name == "htp":
        return onnxruntime_qnn.get_qnn_htp_path()
    if os.path.isabs(name):
        return name
    raise ValueError(f"unknown QNN backend {name!r} (htp, or a library path)")


def _chat_template(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template and the special-token strings it refers to (tokenizer_config.json)."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        tokens[key] = value.get("content") if isinstance(value, dict) else value
    return template, tokens


class QnnSession:
    def __init__(self, model_dir: Path, options: dict[str, Any]):
        self.model_dir = model_dir
        spec = json.loads((model_dir / PIPELINE).read_text(encoding="utf-8"))
        self.spec = spec
        self.chunk = int(spec["chunk"])
        self.context_length = int(spec["context_length"])
        # no grammar engine is part of a QNN bundle yet: response_format / tool_choice that need
        # one are refused (400 naming the field), never ignored
        self.constrains = None
        self.provider = options.get("execution_provider", "qnn")
        self.backend = options.get("backend", "htp")
        self.cpu_fallback = bool(options.get("cpu_fallback", False))
        self.threads = auto_threads(options.get("threads"))
        self.provider_options = {str(k): str(v) for k, v in
                                 (options.get("provider_options") or {}).items()}
        self.nodes_on: dict[str, Counter] = {}  # graph -> execution provider -> node count
        self.qnn = self._qnn_provider() if self.provider == "qnn" else None
        self.graphs = {name: self._open(name) for name in spec["graphs"]}
        self.tokenizer = HfTokenizer(model_dir)
        template, self.special = _chat_template(model_dir)
        self.template = (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                         .from_string(template) if template else None)
        self.eos_token_ids = generation_eos(model_dir, spec.get("eos_token_id"))
        self.kv_names = spec["kv_inputs"]
        self.kv_shape = spec["kv_shape"]
        self.kv_dtype = np.dtype(spec.get("kv_dtype", "float16"))

    # -- sessions ---------------------------------------------------------------------------
    def _qnn_provider(self) -> tuple[list, dict[str, str]]:
        """(QNN EP devices, provider options), worked out once for every graph's session."""
        options = {"backend_path": _backend_path(self.backend), **self.provider_options}
        affinity = self.model_dir / self.spec.get("op_affinity", "qnn_op_affinity.json")
        if affinity.is_file():  # GroupQueryAttention is kept off QNN unless asked for
            options.setdefault("op_affinity", str(affinity.resolve()))
        return _register_qnn(), options

    def _options(self, fallback: bool, quiet: bool = False) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 4 if quiet else 3
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if self.qnn is not None:
            so.add_provider_for_devices(*self.qnn)
            if not fallback:
                so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _open(self, name: str) -> ort.InferenceSession:
        path = str(self.model_dir / self.spec["graphs"][name])
        providers = ["CPUExecutionProvider"] if self.provider == "cpu" else None
        try:
            session = ort.InferenceSession(path, self._options(self.cpu_fallback),
                                           providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types
            if self.provider != "qnn" or self.cpu_fallback:
                raise
            raise ValueError(self._unsupported(name, path, e)) from None
        self.nodes_on[name] = Counter()
        for sub in session.get_provider_graph_assignment_info():
            self.nodes_on[name][sub.ep_name] += len(sub.get_nodes())
        return session

    def _unsupported(self, name: str, path: str, error: Exception) -> str:
        """Why QNN refused a graph: open it again with CPU fallback allowed and name the nodes
        ONNX Runtime then placed on the CPU - the ops this NPU cannot run."""
        try:
            probe = ort.InferenceSession(path, self._options(True, quiet=True))
            off = [n for sub in probe.get_provider_graph_assignment_info()
                   if sub.ep_name != "QNNExecutionProvider" for n in sub.get_nodes()]
        except Exception:  # noqa: BLE001
            off = []
        if not off:
            return (f"QNN {self.backend.upper()} cannot run {Path(path).name} with CPU fallback "
                    f"disabled: {' '.join(str(error).split())[:300]}")
        # name the compute ops; the Quantize/DequantizeLinear around them follow them off QNN
        compute = [n for n in off if n.op_type not in QDQ_OPS] or off
        ops = Counter(n.op_type for n in compute)
        listed = ", ".join(f"{op} x{count}" for op, count in ops.most_common())
        names = ", ".join(n.name for n in compute[:3]) + (", ..." if len(compute) > 3 else "")
        qdq = len(off) - len(compute)
        return (f"QNN {self.backend.upper()} cannot run {Path(path).name} ({name}) with CPU "
                f"fallback disabled: op(s) the NPU does not support here: {listed} ({names})"
                + (f", with {qdq} Quantize/DequantizeLinear node(s) around them" if qdq else ""))

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.template is None:
            raise ValueError(f"{self.model_dir}: no chat template (tokenizer_config.json)")
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    **{k: v for k, v in self.special.items() if v is not None})

    # -- the pipeline -----------------------------------------------------------------------
    def _fresh_cache(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(self.kv_shape, dtype=self.kv_dtype) for name in self.kv_names}

    def _run(self, kind: str, tokens: list[int], seqlen: int, cache: dict,
             head: str = "all") -> np.ndarray | None:
        """One pass of `tokens` (chunk or 1) through the slices; `seqlen` = valid positions in the
        cache after it. Logits of every fed position (head "all"), of the last one ("last": the
        one-token lm_head on the last hidden state - the vocabulary projection is most of the
        time on the simulator), or none ("none": a prefill chunk only fills the cache)."""
        suffix = "chunk" if kind == "context" else "token"
        embed = self.graphs[f"embeddings_{suffix}"]
        hidden = dict(zip([o.name for o in embed.get_outputs()],
                          embed.run(None, {"input_ids": np.asarray([tokens], dtype=np.int64)})))
        for k in range(self.spec["slices"]):
            graph = self.graphs[f"{kind}_{k}"]
            feed = {}
            for inp in graph.get_inputs():
                if inp.name in cache:
                    feed[inp.name] = cache[inp.name]
                elif inp.name == self.spec["seqlens_k"]:
                    feed[inp.name] = np.asarray([[seqlen - 1]], dtype=np.int32)
                elif inp.name == self.spec["total_sequence_length"]:
                    # a padded first chunk: the CPU kernel wants the whole chunk counted
                    feed[inp.name] = np.asarray(max(seqlen, len(tokens)), dtype=np.int32)
                else:
                    feed[inp.name] = hidden[inp.name]
            hidden = {}
            for out, value in zip(graph.get_outputs(), graph.run(None, feed)):
                past = self.spec["present_to_past"].get(out.name)
                if past is not None:
                    cache[past] = value
                else:
                    hidden[out.name] = value
        if head == "none":
            return None
        (final,) = hidden.values()
        if head == "last" and suffix == "chunk":
            suffix, final = "token", np.ascontiguousarray(final[:, -1:])
        graph = self.graphs[f"lm_head_{suffix}"]
        return graph.run(None, {graph.get_inputs()[0].name: final})[0][0]

    def _prefill(self, ids: Sequence[int], cache: dict, all_logits: bool) -> np.ndarray:
        """Fill the cache with `ids` chunk by chunk; logits of every position (or the last).

        A chunk that is not full is shifted back to end at the last token, re-feeding real
        tokens already in the cache (recomputed identically); only a prompt shorter than one
        chunk is padded. Padding goes on the left for QNN, whose attention numbers positions
        back from the last token, and on the right for the CPU kernel, which numbers the first
        prompt from zero: measured both ways on the simulator and the CPU EP."""
        ids, n, c = list(ids), len(ids), self.chunk
        rows = []
        for start in range(0, n, c):
            end = min(start + c, n)
            if end - start == c:
                chunk, keep = ids[start:end], slice(0, c)
            elif n >= c:
                chunk, keep = ids[end - c:end], slice(c - (end - start), c)
            elif self.provider == "qnn":
                chunk, keep = [0] * (c - n) + ids, slice(c - n, c)
            else:
                chunk, keep = ids + [0] * (c - n), slice(0, n)
            if all_logits:
                rows.append(self._run("context", chunk, end, cache)[keep])
            elif end < n:
                self._run("context", chunk, end, cache, head="none")
            elif keep.stop == c:  # the last token sits at the end of the chunk
                rows.append(self._run("context", chunk, end, cache, head="last"))
            else:
                rows.append(self._run("context", chunk, end, cache)[keep][-1:])
        return np.concatenate(rows).astype(np.float32)

    def logits(self, ids: Sequence[int], start: int = 0) -> np.ndarray:
        check_length(len(ids), self.context_length)
        return self._prefill(ids, self._fresh_cache(), all_logits=True)[start:]

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        check_length(len(ids) + 1, self.context_length)
        check_constraint(self, sampling)
        cache = self._fresh_cache()
        logits = self._prefill(ids, cache, all_logits=False)[-1]
        rng = np.random.default_rng(sampling.seed)
        stop = stop_ids(self, sampling)
        length = len(ids)
        for _ in range(min(sampling.max_new_tokens, self.context_length - length)):
            token = _pick(logits, sampling, rng)
            if token in stop:
                return
            yield token
            if length + 1 > self.context_length:
                return
            logits = self._run("iterator", [token], length + 1, cache)[-1]
            length += 1

    def info(self) -> dict[str, Any]:
        simulated = platform.machine().lower() in ("x86_64", "amd64")
        device = (f"QNN {self.backend.upper()}" + (" (Qualcomm's simulator on x86_64)"
                                                   if simulated else "")
                  if self.provider == "qnn" else "CPU execution provider")
        total = Counter()
        for counts in self.nodes_on.values():
            total.update(counts)
        notes = []
        if self.provider == "qnn" and simulated:
            notes.append("measured on Qualcomm's HTP simulator (x86_64): the same QNN HTP "
                         "backend library and op validation as the NPU, not its speed")
        if self.provider != "qnn":
            notes.append("measured with ONNX Runtime's CPU execution provider on the QNN graphs, "
                         "not on the QNN backend")
        return {"runtime": "onnxruntime-qnn", "version": ort.__version__,
                "execution_provider": "QNNExecutionProvider" if self.provider == "qnn"
                else "CPUExecutionProvider", "device": device, "qnn_backend": self.backend
                if self.provider == "qnn" else None, "cpu_fallback": self.cpu_fallback,
                "nodes_by_provider": dict(total),
                "nodes_by_graph": {g: dict(c) for g, c in self.nodes_on.items()},
                "context_length": self.context_length, "prefill_chunk": self.chunk,
                "threads": self.threads, "notes": notes}


def _pick(logits: np.ndarray, sampling, rng: np.random.Generator) -> int:
    """Greedy, or temperature / top-k / top-p sampling over one row of logits."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        z[z < np.partition(z, -sampling.top_k)[-sampling.top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        cut = np.searchsorted(np.cumsum(p[order]), sampling.top_p) + 1
        mask = np.zeros_like(p)
        mask[order[:cut]] = 1
        p = p * mask / (p * mask).sum()
    return int(rng.choice(len(p), p=p))


def open_session(model_dir: Path, options: dict[str, Any]) -> QnnSession:
    return QnnSession(model_dir, options)
