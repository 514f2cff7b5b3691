"""OpenAI-compatible HTTP server for a bundle: standard library only (nothing more to install on a
Raspberry Pi than the runtime itself).

  POST /v1/chat/completions   messages, max_tokens, temperature, top_p, stop, seed, stream
                              (SSE, `data: [DONE]`), stream_options.include_usage
  GET  /v1/models             the one model this server holds
  GET  /health

One model in memory, one generation at a time: requests queue on a lock and are all answered.
A streaming client that disconnects frees the model at its next token. Errors use OpenAI's
error shape; no stack trace ever reaches a client.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .core import Sampling, Session, TextStream, chat_ids
from .worker import WorkerCrashed

MAX_BODY = 1 << 20  # bytes
DRAIN_LIMIT = 16 << 20  # bodies up to this size are read and dropped before the 413


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (status, message, kind,
                                                                       param, code)

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


def parse_request(body: Any, model_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server has "
                       f"'{model_name}'", param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise ApiError(400, f"messages[{i}] must have role system|user|assistant and string "
                           "content", param=f"messages[{i}]")
        turns.append({"role": m["role"], "content": m["content"]})
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    options = body.get("stream_options") or {}
    return {
        "messages": turns,
        "stream": bool(body.get("stream", False)),
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
        "stop": stop or [],
        "sampling": Sampling(
            max_new_tokens=_number(body, "max_tokens", 256, 1, 1 << 20, int),
            temperature=_number(body, "temperature", 0.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1), seed=seed),
    }


class Generation:
    """One completion: tokens -> text pieces, stop strings, finish reason, usage."""

    def __init__(self, session: Session, request: dict[str, Any]):
        self.session, self.request = session, request
        self.prompt_ids = chat_ids(session, request["messages"])
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


def make_handler(session: Session, model_name: str, api_key: str | None, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "phikit"

        def log_message(self, fmt, *args):  # one line per request, on stderr
            sys.stderr.write(f"[phikit serve] {self.address_string()} {fmt % args}\n")

        def _send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if api_key is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

        def _guard(self, fn) -> None:
            try:
                if self.path != "/health" and not self._authorized():
                    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
                fn()
            except ApiError as e:
                self._send_json(e.status, e.body())
            except (BrokenPipeError, ConnectionResetError):
                pass
            except WorkerCrashed as e:  # the next request starts a new runtime process
                sys.stderr.write(f"[phikit serve] {e}; restarting it for the next request\n")
                self._send_json(500, ApiError(500, f"{e}; it is restarted for the next "
                                              "request", kind="server_error").body())
            except Exception as e:  # noqa: BLE001 - never a stack trace to the client
                sys.stderr.write(f"[phikit serve] internal error: {e!r}\n")
                self._send_json(500, ApiError(500, "internal server error",
                                              kind="server_error").body())

        def do_GET(self) -> None:
            def get():
                if self.path == "/health":
                    self._send_json(200, {"status": "ok", "model": model_name})
                elif self.path == "/v1/models":
                    self._send_json(200, {"object": "list", "data": [
                        {"id": model_name, "object": "model", "created": 0,
                         "owned_by": "phikit"}]})
                else:
                    raise ApiError(404, f"no route {self.path}", code="not_found")
            self._guard(get)

        def do_POST(self) -> None:
            self._guard(self._post)

        def _post(self) -> None:
            if self.path != "/v1/chat/completions":
                raise ApiError(404, f"no route {self.path}", code="not_found")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                if length <= DRAIN_LIMIT:  # read it, so the client sees the 413, not a reset
                    while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
                        length -= len(chunk)
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError as e:
                raise ApiError(400, f"malformed JSON: {e}") from None
            request = parse_request(body, model_name)
            with lock:  # one generation at a time; others wait here, in arrival order
                gen = Generation(session, request)
                if request["stream"]:
                    self._stream(gen)
                else:
                    text = "".join(gen.pieces())
                    self._send_json(200, {
                        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                        "created": int(time.time()), "model": model_name,
                        "choices": [{"index": 0, "finish_reason": gen.finish_reason,
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": gen.usage()})

        def _stream(self, gen: Generation) -> None:
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict | None, finish: str | None = None, usage=None) -> None:
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": model_name,
                         "choices": [] if delta is None else [
                             {"index": 0, "delta": delta, "finish_reason": finish}]}
                if usage is not None:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

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


def serve(session: Session, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, ready=None) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(session, model_name, api_key,
                                                            threading.Lock()))
    server.daemon_threads = True
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
