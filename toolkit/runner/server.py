"""OpenAI-compatible HTTP server for a bundle: standard library only (nothing more to install on a
Raspberry Pi than the runtime itself).

  POST /v1/chat/completions   messages (string or text-part contents; roles system, developer
                              (= system), user, assistant, tool (with tool_call_id: shown to the
                              model as a user turn)), max_completion_tokens / max_tokens,
                              temperature, top_p, stop, seed, stream (SSE, `data: [DONE]`),
                              stream_options.include_usage, user
  POST /v1/completions        the same with `prompt` (raw text, no chat template) for messages
  GET  /v1/models             the one model this server holds; /v1/models/{id} that model
  GET  /v1/info               the same, as Azure AI model inference's get_model_info() reads it
  GET  /health

Every request field is honoured or refused (openai_api.HONOURED and INERT, per endpoint);
anything else (tools, response_format json_object / json_schema, logprobs, logit_bias, a
penalty, an unknown field) is a 400 naming it, never silently ignored.

Azure AI Inference clients (GitHub Models / Azure AI code) work unchanged: their ?api-version=
query is ignored and the key is read from `api-key` as well as `Authorization: Bearer`.

One model in memory, one generation at a time: requests queue on a lock and are all answered,
up to `Limits.max_queue` waiting (then 429 with Retry-After). A streaming client that disconnects
frees the model at its next token. Errors use OpenAI's error shape; no stack trace ever reaches a
client; every malformed request is a 400, and the connection stays usable after any error (the
body is read before anything is answered) except bad framing, which closes it.

HTTP, for a server a browser on the same machine can reach: a body is Content-Length bytes, once
(Transfer-Encoding 501, two lengths 400, both closing the connection); POST bodies are
application/json (else 415: a text/plain POST needs no CORS preflight); the Host header must
name this server (403: DNS rebinding); a request must arrive within Limits.request_timeout of
its first byte, and when every connection slot is taken the connection that has waited longest
for its request is closed, so slow clients cannot hold the server; request bytes are escaped in
the log.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from .core import BundleError, Session
from .openai_api import (MAX_BODY, ApiError, Generation, loggable, parse_request,
                         refuse_what_cannot_fit)
from .worker import WorkerCrashed

DRAIN_LIMIT = 16 << 20  # bodies up to this size are read and dropped before the 413
# A connection that has waited for, or been reading, its request this long is a slow client,
# not one still sending: when every connection slot is taken, the longest such one is closed.
SLOW_READER_AFTER = 1.0  # seconds
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


@dataclass
class Limits:
    """What one small device's server accepts; each field but max_body a `run.py serve` flag
    (--backlog, --timeout, --max-connections, --max-queue, --request-timeout, --allow-host)."""

    backlog: int = 128  # pending TCP connections the kernel queues (the stdlib default is 5)
    timeout: float = 60.0  # seconds a connection may sit idle in a read or a write
    # seconds from a request's first byte to its last (request line, headers, body): a client
    # trickling a byte at a time is dropped even though no single read stalls
    request_timeout: float = 30.0
    max_connections: int = 64  # connections served at once; more wait in the backlog
    max_queue: int = 64  # requests waiting for the model; more get 429 + Retry-After
    max_body: int = MAX_BODY
    # Host header names answered besides the loopback names and the bound address ("*": any
    # name): a browser page on another name (DNS rebinding to this address) gets 403
    allowed_hosts: tuple[str, ...] = ()


def _host_name(host: str) -> str | None:
    """The name in a Host header, lower case, without its port or IPv6 brackets (None: not
    a host name at all)."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^\[\]:]*)(:\d*)?", host.strip().lower())
    return match.group(1).strip("[]") if match else None


def host_allowed(host: str, bound: str, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a Host header names this server: a loopback name, the address it is bound to
    or a name in `allowed` ("*": any), with or without a port. On a wildcard address any IP
    address too: a DNS-rebinding page always arrives with its own host *name*, while an
    address in Host means the browser was pointed at this machine's address itself."""
    name = _host_name(host)
    if name is None:
        return False
    if "*" in allowed or name in LOOPBACK_HOSTS or name in (a.lower() for a in allowed):
        return True
    if bound not in WILDCARD_ADDRESSES:
        return name == bound.lower()
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _RequestReader(io.RawIOBase):
    """A connection's reads: each bounded by the idle timeout and, while a request is read,
    all of them together by the request's deadline, which starts at its first byte (a
    per-read timeout alone never fires for a client that sends a byte every few seconds)."""

    def __init__(self, sock: socket.socket, idle: float):
        self.sock, self.idle = sock, idle
        self.budget: float | None = None  # seconds the request being read may take
        self.deadline: float | None = None  # time.monotonic() by which it must be in

    def readable(self) -> bool:
        return True

    def expect_request(self, budget: float) -> None:
        self.budget, self.deadline = budget, None

    def request_read(self) -> None:
        self.budget = self.deadline = None
        self.sock.settimeout(self.idle)  # the answer's writes: the idle timeout again

    def readinto(self, buffer) -> int:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError(f"the request took over {self.budget} s to arrive")
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(buffer)
        if n and self.budget is not None and self.deadline is None:
            self.deadline = time.monotonic() + self.budget
        return n


def make_handler(session: Session, model_name: str, api_key: str | None, lock: threading.Lock,
                 limits: Limits = Limits()):
    queue = threading.BoundedSemaphore(limits.max_queue + 1)  # + the one being served
    model_object = {"id": model_name, "object": "model", "created": 0, "owned_by": "phikit"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "phikit"
        timeout = limits.timeout  # socket timeout for every read and write of a connection

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the stdlib's reader, replaced by one that keeps a deadline
            self.reader = _RequestReader(self.connection, limits.timeout)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self) -> None:
            self.reader.expect_request(limits.request_timeout)
            self.server.reading(self)
            try:
                super().handle_one_request()
            finally:
                self._request_in()

        def _request_in(self) -> None:
            """The request is read: its deadline is over, and its connection may no longer
            be closed to make room for others."""
            self.reader.request_read()
            self.server.done_reading(self)

        def log_message(self, fmt, *args):  # one line per request, on stderr
            sys.stderr.write(f"[phikit serve] {self.address_string()} {loggable(fmt % args)}\n")

        def _send_json(self, status: int, payload: dict,
                       headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:  # the client learns that this connection ends here
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _body_length(self) -> int:
            """The one framing rule: a body is Content-Length bytes, that header given once,
            in digits, and no Transfer-Encoding (a chunked body would be read as the next
            request; two lengths are two readings of where this request ends)."""
            if self.headers.get_all("Transfer-Encoding"):
                raise ApiError(501, "Transfer-Encoding is not supported: send the body with a "
                               "Content-Length", code="not_implemented")
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) > 1:
                raise ApiError(400, f"a request has one Content-Length header, not "
                               f"{len(lengths)}")
            raw = lengths[0] if lengths else "0"
            if not (raw.strip().isascii() and raw.strip().isdigit()):
                raise ApiError(400, f"Content-Length must be a non-negative integer, not "
                               f"{loggable(raw)!r}")
            return int(raw)

        def _read_body(self) -> bytes:
            """The whole body, before anything is answered (an answer that leaves the body in
            the stream breaks the connection's next request). Bad framing closes the
            connection (nothing after it can be trusted to start a request); bodies over the
            limit are drained or the connection is closed."""
            try:
                length = self._body_length()
            except ApiError:
                self.close_connection = True
                raise
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

        def _host_allowed(self) -> bool:
            """A missing Host is allowed (HTTP/1.0 tools; a browser always sends one)."""
            hosts = self.headers.get_all("Host") or []
            return not hosts or (len(hosts) == 1 and self.server.answers_to(hosts[0]))

        def _authorized(self) -> bool:
            """The OpenAI form (Authorization: Bearer KEY, the scheme in any case, as HTTP
            says) or the Azure one (api-key: KEY)."""
            if api_key is None:
                return True
            scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
            bearer = token.strip().encode() if scheme.lower() == "bearer" else b""
            azure = self.headers.get("api-key", "").encode()
            return (hmac.compare_digest(bearer, api_key.encode())
                    | hmac.compare_digest(azure, api_key.encode()))

        def _guard(self, fn) -> None:
            try:
                if not self._host_allowed():
                    raise ApiError(403, "this server does not answer to that Host header: it "
                                   "answers to loopback names and its own address (a guard "
                                   "against DNS rebinding; Limits.allowed_hosts adds names)",
                                   code="host_not_allowed")
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
            except BundleError as e:  # a restart found the bundle changed: nothing is loaded
                sys.stderr.write(f"[phikit serve] {loggable(str(e))}\n")
                self._send_json(503, ApiError(503, "the bundle on disk no longer verifies; the "
                                              "server runs nothing until it is restarted",
                                              kind="server_error").body())
            except Exception as e:  # noqa: BLE001 - never a stack trace to the client
                sys.stderr.write(f"[phikit serve] internal error: {e!r}\n")
                self._send_json(500, ApiError(500, "internal server error",
                                              kind="server_error").body())

        def _body_or_answered(self) -> bytes | None:
            """The body (see _read_body), or None once a bad one has been answered (400 / 413
            / 501) or the connection failed while reading it."""
            try:
                return self._read_body()
            except ApiError as e:
                error = e
            except (OSError, TimeoutError):
                self.close_connection = True
                return None
            finally:
                self._request_in()  # before any answer: its writes get the idle timeout
            self._send_json(error.status, error.body())
            return None

        def do_GET(self) -> None:
            if self._body_or_answered() is None:  # a GET may carry a body too: read it
                return

            def get():
                if self.route == "/health":
                    self._send_json(200, {"status": "ok", "model": model_name})
                elif self.route == "/v1/models":
                    self._send_json(200, {"object": "list", "data": [model_object]})
                elif self.route.startswith("/v1/models/"):  # client.models.retrieve(id)
                    wanted = unquote(self.route.removeprefix("/v1/models/"))
                    if wanted != model_name:
                        raise ApiError(404, f"The model {loggable(wanted)!r} does not exist; "
                                       f"this server has '{model_name}'", param="model",
                                       code="model_not_found")
                    self._send_json(200, model_object)
                elif self.route == "/v1/info":  # Azure AI model inference: get_model_info()
                    self._send_json(200, {"model_name": model_name,
                                          "model_type": "chat-completion",
                                          "model_provider_name": "phikit"})
                else:
                    raise ApiError(404, f"no route {loggable(self.route)}", code="not_found")
            self._guard(get)

        def do_POST(self) -> None:
            raw = self._body_or_answered()
            if raw is not None:
                self._guard(lambda: self._post(raw))

        def _post(self, raw: bytes) -> None:
            if self.route not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(404, f"no route {loggable(self.route)}", code="not_found")
            # JSON only: a text/plain or form POST is one a browser sends cross-site with no
            # preflight, so a page on any site could otherwise drive this server
            if self.headers.get_content_type() != "application/json":
                raise ApiError(415, "the body must be Content-Type: application/json, not "
                               f"{loggable(self.headers.get('Content-Type', '(none)'))!r}",
                               code="unsupported_media_type")
            try:
                body = json.loads(raw or b"null")
            except (ValueError, RecursionError) as e:  # RecursionError: nested 100 000 deep
                raise ApiError(400, f"malformed JSON: {type(e).__name__}") from None
            request = parse_request(body, model_name, chat=self.route == "/v1/chat/completions")
            refuse_what_cannot_fit(request, session.context_length)
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
                    choice = gen.choice()
                    self._send_json(200, {
                        "id": f"{'chatcmpl' if request['chat'] else 'cmpl'}-{uuid.uuid4().hex}",
                        "object": "chat.completion" if request["chat"] else "text_completion",
                        "created": int(time.time()), "model": model_name,
                        "choices": [choice], "usage": gen.usage()})

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

            events = gen.events()
            try:
                for delta, finish in events:
                    event(delta, finish)  # raises BrokenPipeError if the client left
            except WorkerCrashed as e:  # headers are sent: the error goes in the stream
                sys.stderr.write(f"[phikit serve] {e}; restarting it for the next request\n")
                error = ApiError(500, f"{e}; it is restarted for the next request",
                                 kind="server_error").body()
                self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
                self.wfile.flush()
                return
            finally:
                events.close()  # stops the runtime's generator: frees the model for the queue
            if gen.request["include_usage"]:
                event(None, usage=gen.usage())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a real backlog, a cap on connections served at once that slow
    clients cannot hold, a Host allow-list, and no traceback on stderr when a client goes
    away."""

    daemon_threads = True

    def __init__(self, address, handler, limits: Limits):
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.bound_host, self.allowed_hosts = address[0], limits.allowed_hosts
        # handler -> when it began waiting for its request; in that order (oldest first)
        self.readers: dict[Any, float] = {}
        self.readers_lock = threading.Lock()
        super().__init__(address, handler)

    def answers_to(self, host: str) -> bool:
        return host_allowed(host, self.bound_host, self.allowed_hosts)

    def reading(self, handler) -> None:
        with self.readers_lock:
            self.readers.pop(handler, None)
            self.readers[handler] = time.monotonic()

    def done_reading(self, handler) -> None:
        with self.readers_lock:
            self.readers.pop(handler, None)

    def _close_slowest_reader(self) -> bool:
        """Takes a slot back from the connection that has waited longest for its request, if
        that is over SLOW_READER_AFTER: an idle keep-alive or a client trickling its headers,
        never one being answered (64 slow clients used to hold every slot for as long as they
        kept sending, and /health waited in the backlog all that time)."""
        with self.readers_lock:
            handler, since = next(iter(self.readers.items()), (None, 0.0))
            if handler is None or time.monotonic() - since < SLOW_READER_AFTER:
                return False
            del self.readers[handler]
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)  # its read returns: its thread ends
        except OSError:
            pass
        return True

    def process_request(self, request, client_address):
        # beyond max_connections a slow client's slot is taken back; with none, connections
        # wait in the backlog
        acquired = self.slots.acquire(blocking=False)
        while not acquired:
            closed = self._close_slowest_reader()  # its slot comes back as its thread ends
            acquired = self.slots.acquire(timeout=5.0 if closed else 0.05)
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
