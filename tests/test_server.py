"""The OpenAI-compatible server, driven by the real `openai` client and Azure AI Inference's
(slow: needs bundles)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from openai import APIStatusError, BadRequestError, NotFoundError, OpenAI

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What does json.dumps do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], port: int, timeout: float = 120):
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read()
        else:
            raise AssertionError("server did not come up")
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def client(port: int, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300)


def model_name(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text())["name"]


def check_completions(port: int, name: str, max_tokens: int = 16) -> None:
    c = client(port)
    assert [m.id for m in c.models.list()] == [name]
    full = c.chat.completions.create(model=name, messages=CHAT, max_tokens=max_tokens)
    assert full.choices[0].message.content and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.completion_tokens <= max_tokens
    stream = c.chat.completions.create(model=name, messages=CHAT, max_tokens=max_tokens,
                                       stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == full.choices[0].message.content  # greedy: same text both ways
    assert usage.completion_tokens == full.usage.completion_tokens


@pytest.fixture(scope="module")
def onnx_server(int4_bundle):
    port = free_port()
    with server([sys.executable, "-m", "toolkit.cli", "serve", str(int4_bundle)], port):
        yield port, model_name(int4_bundle)


def test_openai_client_stream_and_not(onnx_server):
    check_completions(*onnx_server)


def test_legacy_completions_and_n(onnx_server):
    """/v1/completions (raw prompt, no chat template), streamed and not; n > 1 is refused
    rather than silently answered with one choice."""
    port, name = onnx_server
    c = client(port)
    full = c.completions.create(model=name, prompt="def add(a, b):", max_tokens=8)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens <= 8
    streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(
        model=name, prompt="def add(a, b):", max_tokens=8, stream=True) if chunk.choices)
    assert streamed == full.choices[0].text
    with pytest.raises(APIStatusError) as e:
        c.chat.completions.create(model=name, messages=CHAT, max_tokens=4, n=2)
    assert e.value.status_code == 400 and "'n' must be 1" in str(e.value)


def test_current_client_fields(onnx_server):
    """max_completion_tokens (what current OpenAI clients send) caps generation; content in
    the parts form ([{type: text, text}]) is read as its text."""
    port, name = onnx_server
    c = client(port)
    capped = c.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=3)
    assert capped.usage.completion_tokens <= 3
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    same = c.chat.completions.create(model=name, messages=parts, max_completion_tokens=3)
    assert same.choices[0].message.content == capped.choices[0].message.content


def test_sixteen_concurrent_streams_all_complete(onnx_server):
    port, name = onnx_server
    c = client(port)
    expected = c.chat.completions.create(model=name, messages=CHAT, max_tokens=12)
    results, errors = [], []

    def one() -> None:
        try:
            stream = c.chat.completions.create(model=name, messages=CHAT, max_tokens=12,
                                               stream=True,
                                               stream_options={"include_usage": True})
            text, usage = "", None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            results.append((text, usage))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 16
    for text, usage in results:
        assert text == expected.choices[0].message.content
        assert usage.completion_tokens == expected.usage.completion_tokens
        assert usage.prompt_tokens == expected.usage.prompt_tokens


def test_clients_get_honoured_fields_or_a_400(onnx_server):
    """What the openai and huggingface_hub clients send: the served model by id, developer as
    system, and a 400 naming each field the server would otherwise have ignored."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    port, name = onnx_server
    c = client(port)
    assert c.models.retrieve(name).id == name
    with pytest.raises(NotFoundError):
        c.models.retrieve("gpt-4")
    system = [{"role": "system", "content": "Answer in one word."}, *CHAT]
    developer = [{"role": "developer", "content": "Answer in one word."}, *CHAT]
    as_system, as_developer = (c.chat.completions.create(model=name, messages=m, max_tokens=6)
                               .choices[0].message.content for m in (system, developer))
    assert as_developer == as_system
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for fields, param in (({"tools": tools, "tool_choice": "maybe"}, "tool_choice"),
                          ({"response_format": {"type": "xml"}}, "response_format"),
                          ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
                          ({"extra_body": {"stream": "false"}}, "stream"),
                          ({"extra_body": {"top_k": 5}}, "top_k")):
        with pytest.raises(BadRequestError) as e:
            c.chat.completions.create(model=name, messages=CHAT, max_tokens=4, **fields)
        assert e.value.param == param, e.value
    hf = InferenceClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    out = hf.chat_completion(CHAT, model=name, max_tokens=6)
    assert out.choices[0].message.content == c.chat.completions.create(
        model=name, messages=CHAT, max_tokens=6).choices[0].message.content
    with pytest.raises(HfHubHTTPError) as e:
        hf.chat_completion(CHAT, model=name, max_tokens=4, top_logprobs=2)
    assert e.value.response.status_code == 400
    # JSON mode is honoured (tests/test_structured_output.py drives it on every runtime)
    out = hf.chat_completion(CHAT, model=name, max_tokens=64, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")


def raw_post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_errors_in_openai_shape(onnx_server):
    port, name = onnx_server
    status, body = raw_post(port, b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    status, body = raw_post(port, json.dumps({"model": "gpt-4", "messages": CHAT}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = raw_post(port, b"x" * (2 << 20))
    assert status == 413
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(APIStatusError) as e:
        client(port).chat.completions.create(model=name, messages=long, max_tokens=4)
    assert e.value.status_code == 400 and "context length" in str(e.value)
    status, body = raw_post(port, json.dumps({"messages": CHAT, "temperature": 9}).encode())
    assert status == 400 and body["error"]["param"] == "temperature"


def test_stop_sequences_and_seed(onnx_server):
    port, name = onnx_server
    c = client(port)
    base = c.chat.completions.create(model=name, messages=CHAT, max_tokens=24).choices[0]
    word = base.message.content.split()[2]
    cut = c.chat.completions.create(model=name, messages=CHAT, max_tokens=24, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].message.content
    a, b = (c.chat.completions.create(model=name, messages=CHAT, max_tokens=16, temperature=0.9,
                                      seed=7).choices[0].message.content for _ in range(2))
    assert a == b  # same seed, same sample


def test_disconnect_mid_stream_frees_the_model(onnx_server):
    port, name = onnx_server
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": name, "messages": CHAT, "max_tokens": 4000, "stream": True})
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    sock.close()  # the client goes away mid-generation
    start = time.time()
    done = client(port).chat.completions.create(model=name, messages=CHAT, max_tokens=4)
    assert done.choices[0].message.content is not None
    assert time.time() - start < 60


def test_api_key_is_checked_and_azure_ai_inference_clients_work(int4_bundle):
    """A key-protected server (and --allow-host), driven by OpenAI's client and by Azure AI
    Inference's (what code written for GitHub Models / Azure AI uses): same answers, its
    ?api-version= query, its api-key header and get_model_info()."""
    from azure.ai.inference import ChatCompletionsClient
    from azure.ai.inference.models import UserMessage
    from azure.core.credentials import AzureKeyCredential
    from azure.core.exceptions import HttpResponseError

    port, name = free_port(), model_name(int4_bundle)
    with server([sys.executable, str(int4_bundle / "run.py"), "serve", "--api-key", "s3cret",
                 "--allow-host", "MyPi.local"], port):
        for host, status in ((f"mypi.local:{port}", 200), (f"other.local:{port}", 403)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v1/models", headers={"Host": host,
                                                       "Authorization": "Bearer s3cret"})
            assert conn.getresponse().status == status, host  # --allow-host reached the server
        with pytest.raises(APIStatusError) as e:
            client(port, "wrong").models.list()
        assert e.value.status_code == 401
        assert [m.id for m in client(port, "s3cret").models.list()] == [name]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models", headers={"Authorization": "bearer s3cret"})
        assert conn.getresponse().status == 200  # the scheme in any case (curl users write it so)
        expected = client(port, "s3cret").chat.completions.create(
            model=name, messages=CHAT, max_tokens=8).choices[0].message.content

        def azure(key: str) -> ChatCompletionsClient:
            return ChatCompletionsClient(endpoint=f"http://127.0.0.1:{port}/v1",
                                         credential=AzureKeyCredential(key))

        with azure("s3cret") as c:
            assert c.get_model_info().model_name == name
            full = c.complete(messages=[UserMessage(content=CHAT[0]["content"])], model=name,
                              max_tokens=8)
            assert full.choices[0].message.content == expected  # greedy: the same answer
            assert full.usage.total_tokens == (full.usage.prompt_tokens
                                               + full.usage.completion_tokens)
            streamed = "".join(u.choices[0].delta.content or "" for u in c.complete(
                messages=[UserMessage(content=CHAT[0]["content"])], model=name, max_tokens=8,
                stream=True) if u.choices)
            assert streamed == expected
        with azure("wrong") as c, pytest.raises(HttpResponseError) as e:
            c.complete(messages=[UserMessage(content="hi")], max_tokens=2)
        assert e.value.status_code == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models?api-version=2024-05-01-preview",
                     headers={"api-key": "s3cret"})  # the Azure header alone is enough
        assert conn.getresponse().status == 200


def test_openvino_bundle_serves(ov_int4_bundle):
    port = free_port()
    with server([sys.executable, str(ov_int4_bundle / "run.py"), "serve"], port):
        check_completions(port, model_name(ov_int4_bundle))
        test_disconnect_mid_stream_frees_the_model((port, model_name(ov_int4_bundle)))


def test_mlx_bundle_serves(mlx_int4_bundle):
    port = free_port()
    with server([sys.executable, str(mlx_int4_bundle / "run.py"), "serve"], port):
        check_completions(port, model_name(mlx_int4_bundle), max_tokens=4)
