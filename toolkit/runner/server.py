"""OpenAI-compatible HTTP server for a bundle: standard library only (nothing more to install on a
Raspberry Pi than the runtime itself).

  POST /v1/chat/completions   messages (string or text-part contents), max_completion_tokens /
                              max_tokens, temperature, top_p, stop, seed, stream
                              (SSE, `data: [DONE]`), stream_options.include_usage; n must be 1
  POST /v1/completions        the same with `prompt` (raw text, no chat template) for messages
  GET  /v1/models             the one model this server holds
  GET  /v1/info               the same, as Azure AI model inference's get_model_info() reads it
  GET  /health

Azure AI Inference clients (GitHub Models / Azure AI code) work unchanged: their ?api-version=
query is ignored and the key is read from `api-key` as well as `Authorization: Bearer`.

One model in memory, one generation at a time: requests queue on a lock and are all answered,
up to `Limits.max_queue` waiting (then 429 with Retry-After). A streaming client that disconnects
frees the model at its next token. Errors use OpenAI's error shape; no stack trace ever reaches a
client; every malformed request is a 400, and the connection stays usable after any error (the
body is read before anything is answered).
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import urlsplit

from .core import Sampling, Session, TextStream, chat_ids
from .worker import WorkerCrashed

MAX_BODY = 1 << 20  # bytes
DRAIN_LIMIT = 16 << 20  # bodies up to this size are read and dropped before the 413
MAX_SEED = 2**63 - 1


@dataclass
class Limits:
    """What one small device's server accepts; every field is a `run.py serve` flag."""

    backlog: int = 128  # pending TCP connections the kernel queues (the stdlib default is 5)
    timeout: float = 60.0  # seconds a connection may sit idle in a read or a write
    max_connections: int = 64  # connections served at once; more wait in the backlog
    max_queue: int = 64  # requests waiting for the model; more get 429 + Retry-After
    max_body: int = MAX_BODY


def _text(value: Any) -> bool:
    """A str that encodes as UTF-8 (a lone surrogate from JSON's \\ud800 does not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                       param, code)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _number(body: dict, key: str, default, lo: float, hi: float, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be a number from {lo} to {hi}", param=key)
    return kind(value)


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        content = _content(m.get("content")) if isinstance(m, dict) else None
        if content is None or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must have role system|user|assistant and string "
                           "content (or text content parts)", param=f"messages[{i}]")
        turns.append({"role": m["role"], "content": content})
    return turns


def _content(value: Any) -> str | None:
    """A message's content: a string, or the content-parts form [{type: text, text}] (text
    parts only: this server holds a text model)."""
    if _text(value):
        return value
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and _text(p.get("text"))
            for p in value):
        return "".join(p["text"] for p in value)
    return None


def _prompt(body: dict) -> str:
    """/v1/completions' prompt: a string, or a list holding one (one choice per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not _text(prompt) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one)",
                       param="prompt")
    return prompt


def parse_request(body: Any, model_name: str, chat: bool = True) -> dict[str, Any]:
    """A /v1/chat/completions (chat) or /v1/completions request, checked field by field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server has "
                       f"'{model_name}'", param="model", code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: this server returns one choice per request",
                       param="n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(_text(s) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        raise ApiError(400, f"'seed' must be an integer from 0 to {MAX_SEED}", param="seed")
    options = body.get("stream_options") or {}
    return {
        "chat": chat,
        "messages": _messages(body) if chat else None,
        "prompt": None if chat else _prompt(body),
        "stream": bool(body.get("stream", False)),
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
        "stop": stop or [],
        "sampling": Sampling(
            # current OpenAI clients send max_completion_tokens; older ones max_tokens
            max_new_tokens=_number(body, "max_completion_tokens"
                                   if body.get("max_completion_tokens") is not None
                                   else "max_tokens", 256, 1, 1 << 20, int),
            temperature=_number(body, "temperature", 0.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1), seed=seed),
    }


class Generation:
    """One completion: tokens -> text pieces, stop strings, finish reason, usage."""

    def __init__(self, session: Session, request: dict[str, Any]):
        self.session, self.request = session, request
        self.prompt_ids = (chat_ids(session, request["messages"]) if request["chat"]
                           else session.tokenize(request["prompt"]))
        budget = session.context_length - len(self.prompt_ids)
        if budget < 1:
            raise ApiError(400, f"This model's maximum context length is "
                           f"{session.context_length} tokens; the messages use "
                           f"{len(self.prompt_ids)}", param="messages",
                           code="context_length_exceeded")
        self.sampling = request["sampling"]
        self.sampling.max_new_tokens = min(self.sampling.max_new_tokens, budget)
        self.completion_tokens = 0
        self.finish_reason = "stop"

    def pieces(self) -> Iterator[str]:
        stops, stream = self.request["stop"], TextStream(self.session)
        text, sent = "", 0
        longest = max((len(s) for s in stops), default=0)
        for token in self.session.generate(self.prompt_ids, self.sampling):
            self.completion_tokens += 1
            text += stream.push(token)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                self.finish_reason = "stop"
                return
            # Hold back what could still become a stop string.
            safe = len(text) - (longest - 1 if longest else 0)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if text[sent:]:
            yield text[sent:]
        self.finish_reason = ("length" if self.completion_tokens >= self.sampling.max_new_tokens
                              else "stop")

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids),
                "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens}


def make_handler(session: Session, model_name: str, api_key: str | None, lock: threading.Lock,
                 limits: Limits = Limits()):
    queue = threading.BoundedSemaphore(limits.max_queue + 1)  # + the one being served

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "phikit"
        timeout = limits.timeout  # socket timeout for every read and write of a connection

        def log_message(self, fmt, *args):  # one line per request, on stderr
            sys.stderr.write(f"[phikit serve] {self.address_string()} {fmt % args}\n")

        def _send_json(self, status: int, payload: dict,
                       headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            """The whole body, before anything is answered (an answer that leaves the body in
            the stream breaks the connection's next request). Not trusted: Content-Length
            must be a non-negative integer; bodies over the limit are drained or the
            connection is closed."""
            raw = self.headers.get("Content-Length")
            if raw is None:
                return b""
            try:
                length = int(raw.strip())
            except ValueError:
                length = -1
            if length < 0 or not raw.strip().isdigit():
                self.close_connection = True
                raise ApiError(400, f"Content-Length must be a non-negative integer, not {raw!r}")
            if length > limits.max_body:
                self.close_connection = True
                if length <= DRAIN_LIMIT:  # read it, so the client sees the 413, not a reset
                    while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
                        length -= len(chunk)
                raise ApiError(413, f"request body over {limits.max_body} bytes")
            data = self.rfile.read(length)
            if len(data) != length:
                self.close_connection = True
                raise ApiError(400, "the body is shorter than its Content-Length")
            return data

        @property
        def route(self) -> str:
            """The path without its query: Azure AI Inference clients add ?api-version=..."""
            return urlsplit(self.path).path

        def _authorized(self) -> bool:
            """The OpenAI form (Authorization: Bearer KEY) or the Azure one (api-key: KEY)."""
            if api_key is None:
                return True
            bearer = self.headers.get("Authorization", "").encode()
            azure = self.headers.get("api-key", "").encode()
            return (hmac.compare_digest(bearer, f"Bearer {api_key}".encode())
                    | hmac.compare_digest(azure, api_key.encode()))

        def _guard(self, fn) -> None:
            try:
                if self.route != "/health" and not self._authorized():
                    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
                fn()
            except ApiError as e:
                self._send_json(e.status, e.body(), e.headers)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
            except WorkerCrashed as e:  # the next request starts a new runtime process
                sys.stderr.write(f"[phikit serve] {e}; restarting it for the next request\n")
                self._send_json(500, ApiError(500, f"{e}; it is restarted for the next "
                                              "request", kind="server_error").body())
            except Exception as e:  # noqa: BLE001 - never a stack trace to the client
                sys.stderr.write(f"[phikit serve] internal error: {e!r}\n")
                self._send_json(500, ApiError(500, "internal server error",
                                              kind="server_error").body())

        def _body_or_answered(self) -> bytes | None:
            """The body (see _read_body), or None once a bad one has been answered (400 / 413)
            or the connection failed while reading it."""
            try:
                return self._read_body()
            except ApiError as e:
                self._send_json(e.status, e.body())
            except (OSError, TimeoutError):
                self.close_connection = True
            return None

        def do_GET(self) -> None:
            if self._body_or_answered() is None:  # a GET may carry a body too: read it
                return

            def get():
                if self.route == "/health":
                    self._send_json(200, {"status": "ok", "model": model_name})
                elif self.route == "/v1/models":
                    self._send_json(200, {"object": "list", "data": [
                        {"id": model_name, "object": "model", "created": 0,
                         "owned_by": "phikit"}]})
                elif self.route == "/v1/info":  # Azure AI model inference: get_model_info()
                    self._send_json(200, {"model_name": model_name,
                                          "model_type": "chat-completion",
                                          "model_provider_name": "phikit"})
                else:
                    raise ApiError(404, f"no route {self.route}", code="not_found")
            self._guard(get)

        def do_POST(self) -> None:
            raw = self._body_or_answered()
            if raw is not None:
                self._guard(lambda: self._post(raw))

        def _post(self, raw: bytes) -> None:
            if self.route not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, f"no route {self.route}", code="not_found")
            try:
                body = json.loads(raw or b"null")
            except (ValueError, RecursionError) as e:  # RecursionError: nested 100 000 deep
                raise ApiError(400, f"malformed JSON: {type(e).__name__}") from None
            request = parse_request(body, model_name, chat=self.route == "/v1/chat/completions")
            if not queue.acquire(blocking=False):
                raise ApiError(429, f"{limits.max_queue} requests are already waiting for the "
                               "model; retry later", kind="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            try:
                self._complete(request)
            finally:
                queue.release()

        def _complete(self, request: dict[str, Any]) -> None:
            with lock:  # one generation at a time; others wait here, in arrival order
                gen = Generation(session, request)
                if request["stream"]:
                    self._stream(gen)
                else:
                    text = "".join(gen.pieces())
                    choice = ({"message": {"role": "assistant", "content": text}}
                              if request["chat"] else {"text": text, "logprobs": None})
                    self._send_json(200, {
                        "id": f"{'chatcmpl' if request['chat'] else 'cmpl'}-{uuid.uuid4().hex}",
                        "object": "chat.completion" if request["chat"] else "text_completion",
                        "created": int(time.time()), "model": model_name,
                        "choices": [{"index": 0, "finish_reason": gen.finish_reason,
                                     **choice}],
                        "usage": gen.usage()})

        def _stream(self, gen: Generation) -> None:
            chat = gen.request["chat"]
            cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict | None, finish: str | None = None, usage=None) -> None:
                # chat: {"delta": {...}}; completions: {"text": ...} (the legacy shape)
                body = {} if delta is None else {"delta": delta} if chat else {
                    "text": delta.get("content", ""), "logprobs": None}
                chunk = {"id": cid, "object": "chat.completion.chunk" if chat
                         else "text_completion", "created": created, "model": model_name,
                         "choices": [] if delta is None else [
                             {"index": 0, **body, "finish_reason": finish}]}
                if usage is not None:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            if chat:
                event({"role": "assistant", "content": ""})
            pieces = gen.pieces()
            try:
                for piece in pieces:
                    event({"content": piece})  # raises BrokenPipeError if the client left
            except WorkerCrashed as e:  # headers are sent: the error goes in the stream
                sys.stderr.write(f"[phikit serve] {e}; restarting it for the next request\n")
                error = ApiError(500, f"{e}; it is restarted for the next request",
                                 kind="server_error").body()
                self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
                self.wfile.flush()
                return
            finally:
                pieces.close()  # stops the runtime's generator: frees the model for the queue
            event({}, gen.finish_reason)
            if gen.request["include_usage"]:
                event(None, usage=gen.usage())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a real backlog, a cap on connections served at once, and no
    traceback on stderr when a client goes away."""

    daemon_threads = True

    def __init__(self, address, handler, limits: Limits):
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self.slots.acquire()  # beyond max_connections, connections wait in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            sys.stderr.write(f"[phikit serve] {client_address[0]}: {error!r}\n")


def serve(session: Session, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, ready=None, limits: Limits | None = None) -> None:
    limits = limits or Limits()
    server = _Server((host, port), make_handler(session, model_name, api_key,
                                                threading.Lock(), limits), limits)
    print(f"[phikit serve] {model_name} on http://{host}:{server.server_address[1]}/v1",
          file=sys.stderr, flush=True)
    if ready:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
