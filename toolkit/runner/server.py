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

Every request field is honoured or refused: HONOURED and INERT below list them per endpoint;
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
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

from .core import Sampling, Session, TextStream, chat_ids
from .worker import WorkerCrashed

MAX_BODY = 1 << 20  # bytes
DRAIN_LIMIT = 16 << 20  # bodies up to this size are read and dropped before the 413
MAX_SEED = 2**63 - 1
# No token of a Phi-3 vocabulary spells more characters than this (the longest are runs of
# whitespace): a prompt longer than context_length * MAX_CHARS_PER_TOKEN cannot fit and is
# refused before it is tokenized, the expensive part (a 1 MB chat of `<|end|>` spellings held
# the model 10.6 s only to learn that it was too long).
MAX_CHARS_PER_TOKEN = 16
# A connection that has waited for, or been reading, its request this long is a slow client,
# not one still sending: when every connection slot is taken, the longest such one is closed.
SLOW_READER_AFTER = 1.0  # seconds
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


@dataclass
class Limits:
    """What one small device's server accepts; each field a `run.py serve` flag (--backlog,
    --timeout, --max-connections, --max-queue; request_timeout and allowed_hosts are set by
    whoever builds the Limits)."""

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


def _text(value: Any) -> bool:
    """A str that encodes as UTF-8 (a lone surrogate from JSON's \\ud800 does not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loggable(text: str) -> str:
    """`text` with every non-printable character escaped (ESC, CR, U+2028 as \\x1b, \\r,
    \\u2028): bytes from a request must not drive a terminal or forge a log line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


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


# Every field a request may carry, per endpoint. HONOURED fields do what OpenAI documents.
# INERT fields are accepted only at the value that asks for nothing, what a client sends when
# it spells out a default (n=1, presence_penalty=0, response_format {"type": "text"}). Any
# other field or value is a 400 naming it, so that no client believes a setting took effect
# that this server ignores (tools, response_format json_schema, logprobs, logit_bias, ...).
# A null is the field left out, as in OpenAI's API.
_HONOURED_BOTH = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                  "stream_options", "user"}  # user: an end-user id for the caller's records
HONOURED = {"chat": _HONOURED_BOTH | {"messages", "max_completion_tokens"},
            "completions": _HONOURED_BOTH | {"prompt"}}
_INERT_BOTH = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
INERT = {"chat": {**_INERT_BOTH, "logprobs": False, "response_format": {"type": "text"},
                  "store": False},
         "completions": {**_INERT_BOTH, "echo": False, "best_of": 1}}
STREAM_OPTIONS = {"include_usage"}
# Message fields by role (nulls aside); a tool result is shown to the model as a user turn
MESSAGE_FIELDS = {"system": {"role", "content"}, "developer": {"role", "content"},
                  "user": {"role", "content"}, "assistant": {"role", "content"},
                  "tool": {"role", "content", "tool_call_id"}}
TEMPLATE_ROLE = {"developer": "system", "tool": "user"}  # the Phi-3 template knows 3 roles


def _same(value: Any, default: Any) -> bool:
    """JSON equality: false is not 0, 0.0 is 0."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def _checked_fields(body: dict, endpoint: str) -> dict[str, Any]:
    """The request's non-null fields, each honoured or at its inert default, else a 400."""
    fields = {key: value for key, value in body.items() if value is not None}
    for key, value in fields.items():
        if key in HONOURED[endpoint]:
            continue
        if key in INERT[endpoint]:
            default = INERT[endpoint][key]
            if not _same(value, default):
                raise ApiError(400, f"'{key}' must be {json.dumps(default)} (or absent): this "
                               "server does not honour other values", param=key,
                               code="unsupported_value")
            continue
        raise ApiError(400, f"'{key}' is not supported by this server's {endpoint} endpoint",
                       param=key, code="unsupported_parameter")
    return fields


def _number(fields: dict, key: str, default, lo: float, hi: float, kind=float):
    """A JSON number (an integer where kind is int; never a boolean) from lo to hi."""
    value = fields.get(key, default)
    types = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or not lo <= value <= hi:
        what = "an integer" if kind is int else "a number"
        raise ApiError(400, f"'{key}' must be {what} from {lo} to {hi}", param=key)
    return kind(value)


def _boolean(fields: dict, key: str, param: str | None = None) -> bool:
    value = fields.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param or key}' must be true or false (a JSON boolean)",
                       param=param or key)
    return value


def _messages(fields: dict) -> list[dict[str, str]]:
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in MESSAGE_FIELDS:
            raise ApiError(400, f"{where}.role must be one of {', '.join(MESSAGE_FIELDS)}",
                           param=f"{where}.role")
        for key, value in m.items():
            if value is not None and key not in MESSAGE_FIELDS[role]:
                raise ApiError(400, f"{where}.{key} is not supported by this server (in a "
                               f"{role} message)", param=f"{where}.{key}",
                               code="unsupported_parameter")
        content = _content(m.get("content"))
        if content is None:
            raise ApiError(400, f"{where}.content must be a string or text content parts",
                           param=f"{where}.content")
        if role == "tool":
            call = m.get("tool_call_id")
            if not _text(call) or not call:
                raise ApiError(400, f"{where}.tool_call_id must be a non-empty string",
                               param=f"{where}.tool_call_id")
            content = f"Result of tool call {call}:\n{content}"
        turns.append({"role": TEMPLATE_ROLE.get(role, role), "content": content})
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


def _prompt(fields: dict) -> str:
    """/v1/completions' prompt: a string, or a list holding one (one choice per request)."""
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not _text(prompt) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one)",
                       param="prompt")
    return prompt


def _stream_options(fields: dict) -> bool:
    """stream_options.include_usage (the only option this server has)."""
    options = fields.get("stream_options", {})
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    for key, value in options.items():
        if value is not None and key not in STREAM_OPTIONS:
            raise ApiError(400, f"'stream_options.{key}' is not supported by this server",
                           param=f"stream_options.{key}", code="unsupported_parameter")
    return _boolean({k: v for k, v in options.items() if v is not None}, "include_usage",
                    "stream_options.include_usage")


def parse_request(body: Any, model_name: str, chat: bool = True) -> dict[str, Any]:
    """A /v1/chat/completions (chat) or /v1/completions request, checked field by field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    fields = _checked_fields(body, "chat" if chat else "completions")
    model = fields.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model {loggable(str(model))!r} does not exist; this server "
                       f"has '{model_name}'", param="model", code="model_not_found")
    if not _text(fields.get("user", "")):
        raise ApiError(400, "'user' must be a string", param="user")
    stop = fields.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(_text(s) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = fields.get("seed")
    if seed is not None:
        seed = _number(fields, "seed", None, 0, MAX_SEED, int)
    # current OpenAI clients send max_completion_tokens; older ones max_tokens
    budget = "max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"
    return {
        "chat": chat,
        "messages": _messages(fields) if chat else None,
        "prompt": None if chat else _prompt(fields),
        "stream": _boolean(fields, "stream"),
        "include_usage": _stream_options(fields),
        "stop": stop or [],
        "sampling": Sampling(
            max_new_tokens=_number(fields, budget, 256, 1, 1 << 20, int),
            temperature=_number(fields, "temperature", 0.0, 0, 2),
            top_p=_number(fields, "top_p", 1.0, 0, 1), seed=seed),
    }


def refuse_what_cannot_fit(request: dict[str, Any], context_length: int) -> None:
    """A 400 for a prompt too long to fit in any tokenization, decided on its length alone:
    before the model's lock and before the tokenizer, whose cost grows with the text."""
    texts = ([m["content"] for m in request["messages"]] if request["chat"]
             else [request["prompt"]])
    chars, most = sum(map(len, texts)), context_length * MAX_CHARS_PER_TOKEN
    if chars > most:
        field = "messages" if request["chat"] else "prompt"
        raise ApiError(400, f"This model's maximum context length is {context_length} tokens; "
                       f"the {field} hold {chars} characters, more than {most} "
                       f"({MAX_CHARS_PER_TOKEN} per token) could ever fit", param=field,
                       code="context_length_exceeded")


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
