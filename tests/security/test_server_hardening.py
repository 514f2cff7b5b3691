"""The server against hostile or careless clients (issue 17, item 5): malformed requests are 400s,
not 500s; a connection stays usable after every error; limits hold under load. The server is the
bundle's own (toolkit/runner/server.py) around a stand-in Session, so these run in seconds."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from toolkit.runner.core import Sampling
from toolkit.runner.server import Limits, _Server, make_handler

CHAT = [{"role": "user", "content": "Hi"}]


class FakeSession:
    """Characters as tokens; generation echoes 'ok' (optionally slowly); what the template got
    and how many characters were tokenized are kept, for the tests to read."""

    eos_token_ids = (0,)
    context_length = 256

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.rendered: list[dict] = []
        self.tokenized_chars = 0

    def tokenize(self, text, add_special_tokens=True):
        self.tokenized_chars += len(text)
        return [ord(c) % 250 + 1 for c in text]

    def detokenize(self, ids):
        return "".join(chr(96 + i % 26) for i in ids)

    def render_chat(self, messages):
        self.rendered = messages
        return "".join(m["content"] for m in messages)

    def generate(self, ids, sampling: Sampling):
        for i in range(min(3, sampling.max_new_tokens)):
            time.sleep(self.delay)
            yield 15 + i


@pytest.fixture
def serve():
    """start(...) -> the port of a server on 127.0.0.1 around a FakeSession."""
    servers = []

    def start(limits: Limits = Limits(), delay: float = 0.0, api_key: str | None = None,
              session: FakeSession | None = None, lock: threading.Lock | None = None) -> int:
        server = _Server(("127.0.0.1", 0), make_handler(
            session or FakeSession(delay), "m", api_key, lock or threading.Lock(), limits),
            limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers=None):
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                  **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null"), resp


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


GOOD = json.dumps({"messages": CHAT, "max_tokens": 3}).encode()


@pytest.mark.parametrize("length", ["-1", "abc", "+5", "1e3"])
def test_content_length_is_not_trusted(serve, length):
    port = serve()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            "\r\n").encode()
    reply = raw(port, head + GOOD)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"Content-Length must be a non-negative integer" in reply


@pytest.mark.parametrize("body", [
    json.dumps({"messages": CHAT, "seed": 10**30}).encode(),
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}',
], ids=["huge-seed", "nested-100000", "lone-surrogate", "surrogate-stop"])
def test_malformed_requests_are_400(serve, body):
    port = serve()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, reply, _ = post(conn, "/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error"


# (a query string is ignored on a known route: Azure AI Inference clients add ?api-version=)
@pytest.mark.parametrize("first", ["/v1/embeddings", "/v1/embeddings?api-version=x"],
                         ids=["404", "404-query"])
def test_keep_alive_survives_an_early_error(serve, first):
    """An error answered before the body was read used to leave the body in the stream: the
    next request on the connection then failed (501 'Unsupported method ('{...}POST')')."""
    port = serve()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, _, _ = post(conn, first, GOOD)
    assert status == 404
    status, reply, _ = post(conn, "/v1/chat/completions", GOOD)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"]


def test_keep_alive_survives_a_401(serve):
    port = serve(api_key="secret")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, _, _ = post(conn, "/v1/chat/completions", GOOD)
    assert status == 401
    status, _, _ = post(conn, "/v1/chat/completions", GOOD, {"Authorization": "Bearer secret"})
    assert status == 200


def test_queue_limit_answers_429_with_retry_after(serve):
    port = serve(Limits(max_queue=1), delay=0.3)

    def one(_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        status, _, resp = post(conn, "/v1/chat/completions", GOOD)
        return status, resp.getheader("Retry-After")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    statuses = sorted(s for s, _ in results)
    assert 200 in statuses and 429 in statuses, results
    assert all(r == "1" for s, r in results if s == 429)


def test_stalled_clients_do_not_hold_the_server(serve):
    """Connections that send half a request are dropped after the timeout; meanwhile and after,
    real requests are answered."""
    port = serve(Limits(timeout=1.0, max_connections=8))
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in stalled:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
    try:
        time.sleep(2.5)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status, _, _ = post(conn, "/v1/chat/completions", GOOD)
        assert status == 200
    finally:
        for s in stalled:
            s.close()



def completion_status(port: int, timeout: float) -> int:
    """The status of one chat completion on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        return post(conn, "/v1/chat/completions", GOOD)[0]
    finally:
        conn.close()

def test_soak_1000_requests_64_clients(serve, capsys):
    """1 000 completions from 64 concurrent clients (a backlog of 128): none fails, and clients
    that leave early print no traceback."""
    port = serve(Limits())

    def one(i):
        return completion_status(port, timeout=60)

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(one, range(1000)))
    seconds = time.perf_counter() - start
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    # clients that hang up mid-stream
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"messages": CHAT, "stream": True}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.close()
    time.sleep(0.5)
    assert "Traceback" not in capsys.readouterr().err
    print(f"\nsoak: 1000 requests, 64 clients, 0 failures, {seconds:.1f} s")


# --- field honesty (issue 17 follow-up, item A): honoured, or a 400 naming the field ---------

def chat(**fields) -> bytes:
    return json.dumps({"messages": CHAT, "max_tokens": 3, **fields}).encode()


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}, "x": 1}}]),
    ("tool_choice", "auto"),  # without tools
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("logprobs", True),
    ("top_logprobs", 2),
    ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 1),
    ("n", 2),
    ("top_k", 5),  # an unknown field (vLLM's), not silently dropped either
    ("stream_options", {"include_obfuscation": True}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unhonoured_fields_are_400_naming_them(serve, field, value):
    """These were all answered 200 with the field ignored: a client believed it got JSON mode,
    tool calls or a penalty it did not. (The stand-in session has no structured-output
    mechanism, so response_format is refused here as on a runtime without one.)"""
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    status, reply, _ = post(conn, "/v1/chat/completions", chat(**{field: value}))
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and field in error["param"], error
    assert field in error["message"]


def test_fields_at_their_defaults_are_accepted(serve):
    """What clients send when they spell out a default still works (the openai client sends
    only the fields given; huggingface_hub drops nulls; others send nulls)."""
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    body = chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, logit_bias={},
                response_format={"type": "text"}, user="u-1", seed=3, stop=["\n\n"],
                max_completion_tokens=2, temperature=0, top_p=1, store=False, stream=False,
                stream_options={"include_usage": True}, tools=None, tool_choice=None,
                top_logprobs=None, model="m")
    status, reply, _ = post(conn, "/v1/chat/completions", body)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "x"), ("best_of", 2),
                                          ("logprobs", 1), ("messages", CHAT)])
def test_completions_fields_are_its_own(serve, field, value):
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    ok = json.dumps({"prompt": "def f():", "max_tokens": 2, "echo": False, "best_of": 1})
    status, _, _ = post(conn, "/v1/completions", ok.encode())
    assert status == 200
    body = json.dumps({"prompt": "def f():", "max_tokens": 2, field: value}).encode()
    status, reply, _ = post(conn, "/v1/completions", body)
    assert status == 400 and reply["error"]["param"] == field, reply


@pytest.mark.parametrize("field, value", [
    ("stream", "false"), ("stream", 0), ("max_tokens", True), ("max_tokens", 3.5),
    ("max_completion_tokens", "3"), ("temperature", "0.5"), ("temperature", False),
    ("seed", 1.5), ("user", 7), ("stream_options", {"include_usage": "yes"}),
])
def test_json_types_are_checked(serve, field, value):
    """`stream: "false"` (a string) used to stream; booleans must be JSON booleans, numbers
    numbers (never booleans), integers integers."""
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    status, reply, resp = post(conn, "/v1/chat/completions", chat(**{field: value}))
    assert status == 400 and resp.getheader("Content-Type") == "application/json", reply
    assert reply["error"]["param"].startswith(field), reply


# --- roles, models/{id}, the Authorization scheme (item B) ------------------------------------

def test_developer_is_system_and_tool_results_are_user_turns(serve):
    session = FakeSession()
    conn = http.client.HTTPConnection("127.0.0.1", serve(session=session), timeout=30)
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": "Let me compute it.", "tool_calls": None},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    status, reply, _ = post(conn, "/v1/chat/completions", chat(messages=messages))
    assert status == 200, reply
    assert session.rendered == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "Let me compute it."},
        {"role": "user", "content": "Result of tool call call_1:\n42"}]


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
    ({"role": "function", "name": "f", "content": "42"}, "messages[0].role"),
    ({"role": "user", "content": "hi", "name": "bob"}, "messages[0].name"),
    ({"role": "assistant", "content": None,
      "tool_calls": [{"id": "c", "type": "function"}]}, "messages[0].tool_calls[0]"),  # no call
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "messages[0].content"),
])
def test_unsupported_message_fields_are_400_naming_them(serve, message, param):
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    status, reply, _ = post(conn, "/v1/chat/completions", chat(messages=[message]))
    assert status == 400 and reply["error"]["param"] == param, reply


def test_models_retrieve(serve):
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    conn.request("GET", "/v1/models/m")
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read()) == {"id": "m", "object": "model", "created": 0,
                                       "owned_by": "phikit"}
    conn.request("GET", "/v1/models/gpt-4")
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    assert resp.status == 404 and error["code"] == "model_not_found", error
    assert error["type"] == "invalid_request_error" and error["param"] == "model"


@pytest.mark.parametrize("authorization, status", [
    ("Bearer secret", 200), ("bearer secret", 200), ("BEARER  secret", 200),
    ("Basic secret", 401), ("bearer wrong", 401), ("secret", 401)])
def test_authorization_scheme_is_case_insensitive(serve, authorization, status):
    conn = http.client.HTTPConnection("127.0.0.1", serve(api_key="secret"), timeout=30)
    got, reply, _ = post(conn, "/v1/chat/completions", GOOD, {"Authorization": authorization})
    assert got == status, reply


# --- HTTP hardening (item C): each attack bounded in count and time, loopback only ------------

def trickle(port: int, seconds: float, every: float, reconnect: bool = False,
            stop: threading.Event | None = None) -> threading.Thread:
    """A slow client: a request's headers one byte every `every` seconds, for `seconds`
    (reconnecting when the server drops it, if `reconnect`). Returns its running thread."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 1000

    def run():
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (stop and stop.is_set()):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
                    for byte in head:
                        if time.monotonic() >= end or (stop and stop.is_set()):
                            return
                        s.sendall(bytes([byte]))
                        time.sleep(every)
            except OSError:
                pass  # dropped by the server: what it should do
            if not reconnect:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_64_slow_clients_do_not_starve_health(serve):
    """64 connections sending their headers a byte a second held all 64 connection slots for
    as long as they kept sending (a per-read timeout never fires): /health waited in the
    backlog past any --timeout. Now, with every slot taken, the connection that has waited
    longest for its request is closed for the new one."""
    port = serve(Limits())  # the defaults: 64 connections, 60 s idle timeout
    slow = [trickle(port, seconds=6, every=1.0) for _ in range(64)]
    try:
        time.sleep(2)  # every slot is now held by a slow client
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        assert time.monotonic() - start < 1.5
    finally:
        for thread in slow:
            thread.join(timeout=10)


def test_a_request_has_a_deadline_from_its_first_byte(serve):
    """A client that sends a byte every 0.25 s never trips the 60 s idle timeout; the 1.5 s
    request deadline drops it anyway (Limits.request_timeout; 30 s by default)."""
    port = serve(Limits(request_timeout=1.5))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        try:
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 4:
                s.sendall(bytes([byte]))
                time.sleep(0.25)
                if time.monotonic() - start > 6:
                    pytest.fail("the server still reads a request begun 6 s ago")
        except OSError:
            pass  # reset: dropped
        s.settimeout(2)
        assert s.recv(100) == b""  # closed by the server
        assert 1.4 < time.monotonic() - start < 3.0


def replies(data: bytes) -> list[bytes]:
    """The status lines in what a server sent back."""
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


SMUGGLED = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_transfer_encoding_is_refused_and_closes(serve):
    """A chunked request got a 400 (an empty body) and its body was then parsed as a second
    request (200): a request smuggled past anything in front of the server."""
    port = serve()
    reply = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + SMUGGLED)
    assert replies(reply) == [b"HTTP/1.1 501 Not Implemented"], reply
    assert b"Connection: close" in reply and b"Transfer-Encoding" in reply


@pytest.mark.parametrize("lengths", [("0", None), (None, None), ("5", "0")],
                         ids=["conflicting", "duplicate", "conflicting-second-zero"])
def test_two_content_lengths_are_refused_and_close(serve, lengths):
    port = serve()
    body = GOOD + SMUGGLED
    first, second = (v or str(len(GOOD)) for v in lengths)
    reply = raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: " + first.encode()
                + b"\r\nContent-Length: " + second.encode() + b"\r\n\r\n" + body)
    assert replies(reply) == [b"HTTP/1.1 400 Bad Request"], reply
    assert b"one Content-Length header" in reply and b"Connection: close" in reply


def post_with_host(port: int, host: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True)
    for key, value in (("Host", host.format(port=port)), ("Content-Type", "application/json"),
                       ("Content-Length", str(len(GOOD)))):
        conn.putheader(key, value)
    conn.endheaders(GOOD)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("localhost:{port}", 200), ("127.0.0.1", 200), ("127.0.0.1:{port}", 200),
    ("[::1]:{port}", 200), ("LocalHost", 200),
    ("evil.example", 403), ("evil.example:{port}", 403), ("localhost.evil.example", 403),
    ("192.168.1.7", 403), ("", 403), ("[::1", 403)])
def test_host_allow_list(serve, host, status):
    """A key-less server on a laptop answered any Host: a page on evil.example, rebound to
    127.0.0.1 by its DNS, could drive it from the user's browser."""
    got, reply = post_with_host(serve(), host)
    assert got == status, reply
    if status == 403:
        assert reply["error"]["code"] == "host_not_allowed"


def test_allowed_hosts_option(serve):
    """`Limits.allowed_hosts` adds names; '*' allows any."""
    port = serve(Limits(allowed_hosts=("MyPi.local",)))
    assert post_with_host(port, "mypi.local:{port}")[0] == 200
    assert post_with_host(port, "other.local:{port}")[0] == 403
    assert post_with_host(serve(Limits(allowed_hosts=("*",))), "any.example")[0] == 200


def test_host_allow_list_for_a_wildcard_or_named_bind():
    """Bound to a wildcard (a Pi on its LAN), any IP address is its own (a rebinding page
    always comes with a name); bound to an address or a name, that one."""
    from toolkit.runner.server import host_allowed

    assert host_allowed("192.168.1.7:8000", "0.0.0.0")
    assert host_allowed("[fe80::1]:8000", "::")
    assert not host_allowed("evil.example:8000", "0.0.0.0")
    assert host_allowed("10.0.0.5:8000", "10.0.0.5")
    assert not host_allowed("10.0.0.6", "10.0.0.5")
    assert host_allowed("MyPi.local", "mypi.local")


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("application/json; charset=utf-8", 200),
    ("Application/JSON", 200), ("text/plain", 415), ("text/plain; charset=utf-8", 415),
    ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    (None, 415)])
def test_post_bodies_must_be_json(serve, content_type, status):
    """A text/plain POST is one a browser sends cross-site without a preflight: it was
    served."""
    conn = http.client.HTTPConnection("127.0.0.1", serve(), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    if content_type is not None:
        conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(len(GOOD)))
    conn.endheaders(GOOD)
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    assert resp.status == status, reply
    if status == 415:
        assert reply["error"]["code"] == "unsupported_media_type"
        status, _, _ = post(conn, "/v1/chat/completions", GOOD)  # keep-alive still works
        assert status == 200


def test_log_lines_escape_control_bytes(serve, capfd):
    """ESC and CR from a request line reached the log raw (a terminal reading it moved its
    cursor, cleared the screen, or showed a forged line)."""
    port = serve()
    raw(port, b"GET /\x1b[2J\x1b[31mforged\rline HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    raw(port, b"GET /v1/models/\x1b[2J\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.2)
    err = capfd.readouterr().err
    assert "[phikit serve]" in err and "\\x1b[2J" in err and "\\x07" in err, err
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err


def test_a_prompt_that_cannot_fit_is_refused_before_the_model(serve):
    """A 1 MB chat of `<|end|>` spellings held the model lock before its context-length 400:
    on the tiny ONNX bundle (2 cores) 10.6 s; now refused on its length in a few ms, without
    waiting for the model (held here by another request) or tokenizing a character."""
    session, busy = FakeSession(), threading.Lock()
    port = serve(session=session, lock=busy)
    content = "<|end|>" * ((1 << 20) // 7 - 100)
    with busy:  # the model is busy with someone else's long generation
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start = time.monotonic()
        status, reply, _ = post(conn, "/v1/chat/completions",
                                chat(messages=[{"role": "user", "content": content}]))
        seconds = time.monotonic() - start
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    assert seconds < 2 and session.tokenized_chars == 0
    # one that may fit is still tokenized and measured
    status, reply, _ = post(conn, "/v1/chat/completions",
                            chat(messages=[{"role": "user", "content": "x" * 1000}]))
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert session.tokenized_chars >= 1000


def test_soak_with_64_slow_clients_held(serve):
    """The soak below while 64 slow clients keep trying to hold every connection (each
    reconnects as soon as it is dropped): every request is answered, /health stays quick."""
    port = serve(Limits())
    stop = threading.Event()
    slow = [trickle(port, seconds=60, every=0.5, reconnect=True, stop=stop) for _ in range(64)]

    def one(i):
        return completion_status(port, timeout=30)

    try:
        time.sleep(1.5)
        start = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(one, range(300)))
        seconds = time.perf_counter() - start
        assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}
        health = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        assert time.perf_counter() - health < 2
    finally:
        stop.set()
        for thread in slow:
            thread.join(timeout=10)
    print(f"\nsoak with 64 slow clients: 300 requests, 64 clients, 0 failures, {seconds:.1f} s")
