"""Structured output (issue 38): the real `openai` client's chat.completions.parse() with a
Pydantic model, JSON mode, and a tool-call round trip (call -> tool result -> answer), streamed
and not, against a served bundle of each CPU runtime. The tiny model has random weights: what
it writes is noise, so a schema that holds on every answer is the constraint's doing alone.

The fast tests at the end drive the server around stand-in sessions: the prompt a chat without
tools gets is unchanged, and a runtime without a mechanism is a 400 naming the field."""

from __future__ import annotations

import json
import sys
import threading
from typing import Literal

import pytest
from openai import BadRequestError, pydantic_function_tool
from pydantic import BaseModel, ConfigDict, Field

from test_server import client, free_port, model_name, server

# every runtime phikit builds for a CPU, by the fixture of its tiny int4 bundle
RUNTIMES = {"onnx": "int4_bundle", "openvino": "ov_int4_bundle", "gguf": "gguf_int4_bundle",
            "mlx": "mlx_int4_bundle"}
PROMPTS = ["Describe json.dumps as a record.", "Rate the number seven.", "Hi"]
# greedy, then sampled with three seeds: four different answers per prompt and runtime
SAMPLINGS = [{"temperature": 0}, *({"temperature": 1.0, "seed": s} for s in (1, 2, 3))]


class Record(BaseModel):
    """Bounded fields (maxLength, minimum/maximum, maxItems, enum): a random model that is
    not held to them overruns every one."""
    model_config = ConfigDict(extra="forbid")
    title: str = Field(max_length=24)
    score: int = Field(ge=0, le=100)
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    done: bool


class GetWeather(BaseModel):
    """The weather in a city."""
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class Convert(BaseModel):
    """Convert an amount between currencies."""
    model_config = ConfigDict(extra="forbid")
    amount: int = Field(ge=0, le=10000)
    to: Literal["EUR", "USD"]


TOOLS = [pydantic_function_tool(GetWeather), pydantic_function_tool(Convert)]
WEATHER = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module", params=list(RUNTIMES))
def served(request):
    """(openai client, model name) of one runtime's bundle served by its own run.py; one
    server per runtime, shared by the tests below."""
    bundle = request.getfixturevalue(RUNTIMES[request.param])
    port = free_port()
    with server([sys.executable, str(bundle / "run.py"), "serve"], port, timeout=300):
        yield client(port), model_name(bundle)


@pytest.mark.slow
def test_parse_with_a_pydantic_model_holds_the_schema_every_time(served):
    c, name = served
    for prompt in PROMPTS:
        for sampling in SAMPLINGS:
            out = c.chat.completions.parse(model=name, response_format=Record, max_tokens=200,
                                           messages=[{"role": "user", "content": prompt}],
                                           **sampling)
            choice = out.choices[0]
            assert choice.finish_reason == "stop", (prompt, sampling, choice)
            assert isinstance(choice.message.parsed, Record), choice.message.content
            # the same text validates on its own (parse() raised otherwise, but say it)
            Record.model_validate_json(choice.message.content)


@pytest.mark.slow
def test_json_mode_answers_an_object(served):
    """json_object asks for any object, with no bound on its members: a random model may write
    them until max_tokens, and then the answer is cut ("length", as OpenAI answers). What it
    never writes is anything but an object."""
    c, name = served
    for sampling in SAMPLINGS:
        out = c.chat.completions.create(model=name, messages=WEATHER, max_tokens=64,
                                        response_format={"type": "json_object"}, **sampling)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert finish == "length" and out.usage.completion_tokens == 64, out
            assert text.startswith("{"), text
    bogus = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    with pytest.raises(BadRequestError) as e:  # the grammar engine's refusal, before a token
        c.chat.completions.create(model=name, messages=WEATHER, max_tokens=8,
                                  response_format=bogus)
    assert e.value.param == "response_format" and "bogus" in e.value.message


@pytest.mark.slow
def test_tool_call_round_trip(served):
    """required: a call of one of the listed functions whose arguments hold its schema; the
    tool's result goes back as a tool message and the model answers in text."""
    c, name = served
    for sampling in SAMPLINGS:
        out = c.chat.completions.parse(model=name, messages=WEATHER, tools=TOOLS,
                                       tool_choice="required", max_tokens=200, **sampling)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert isinstance(call.function.parsed_arguments, (GetWeather, Convert)), call
    named = c.chat.completions.parse(
        model=name, messages=WEATHER, tools=TOOLS, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    (call,) = named.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)
    follow = [*WEATHER, named.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "12 degrees, rain"}]
    answer = c.chat.completions.create(model=name, messages=follow, tools=TOOLS,
                                       tool_choice="none", max_tokens=8)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in (
        "stop", "length")


@pytest.mark.slow
def test_streamed_tool_call_is_assembled_by_the_client(served):
    c, name = served
    kwargs = dict(model=name, messages=WEATHER, tools=TOOLS, tool_choice="required",
                  max_tokens=200)
    with c.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    whole = c.chat.completions.parse(**kwargs)  # greedy: the same call both ways
    assert final.choices[0].finish_reason == "tool_calls"
    (streamed,), (plain,) = final.choices[0].message.tool_calls, whole.choices[0].message.tool_calls
    assert streamed.function.name == plain.function.name
    assert json.loads(streamed.function.arguments) == json.loads(plain.function.arguments)
    assert streamed.function.parsed_arguments is not None


@pytest.mark.slow
def test_logprobs_are_the_models(served):
    """logprobs / top_logprobs in OpenAI's shape: one entry per generated token, its text
    what the answer says; greedy picks the most likely token, so each chosen token is the top
    of its own list (to the rounding between the decode path and the teacher-forced pass)."""
    c, name = served
    out = c.chat.completions.create(model=name, messages=WEATHER, max_tokens=12,
                                    logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(e.token for e in content).strip() == choice.message.content.strip()
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token or \
            abs(e.top_logprobs[0].logprob - e.logprob) < 1e-2, e
    with pytest.raises(BadRequestError) as err:
        c.chat.completions.create(model=name, messages=WEATHER, max_tokens=4, logprobs=True,
                                  stream=True)
    assert err.value.param == "logprobs"


# --- fast: the server around stand-in sessions ---------------------------------------------

class Scripted:
    """Characters as tokens; generation spells `reply` (what a constrained runtime would have
    produced); the turns the template got are kept."""
    eos_token_ids = (0,)
    context_length = 4096

    def __init__(self, reply: str = "ok", constrains: str | None = "scripted"):
        self.reply, self.constrains, self.rendered, self.sampling = reply, constrains, None, None

    def tokenize(self, text, add_special_tokens=True):
        return [ord(ch) for ch in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))

    def render_chat(self, messages):
        self.rendered = messages
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def generate(self, ids, sampling):
        self.sampling = sampling
        for i, ch in enumerate(self.reply):
            if i >= sampling.max_new_tokens:
                return
            yield ord(ch)


@pytest.fixture
def scripted():
    from toolkit.runner.server import Limits, _Server, make_handler

    servers = []

    def start(session: Scripted):
        srv = _Server(("127.0.0.1", 0), make_handler(session, "m", None, threading.Lock(),
                                                     Limits()), Limits())
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return client(srv.server_address[1])

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_a_chat_without_tools_gets_the_same_prompt(scripted):
    """Fields at their defaults (tools absent or null, response_format text) change nothing
    the model sees: the turns are the client's, and no constraint reaches the runtime."""
    session = Scripted()
    c = scripted(session)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    c.chat.completions.create(model="m", messages=chat, max_tokens=2)
    plain = (session.rendered, session.tokenize(session.render_chat(session.rendered)))
    c.chat.completions.create(model="m", messages=chat, max_tokens=2, tool_choice=None,
                              response_format={"type": "text"}, extra_body={"tools": None})
    assert session.rendered == chat and session.sampling.constraint is None
    assert (session.rendered, session.tokenize(session.render_chat(session.rendered))) == plain
    c.chat.completions.create(model="m", messages=chat, max_tokens=2, tools=TOOLS)
    system = session.rendered[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools") and '"name": "GetWeather"' in system
    assert session.rendered[1:] == chat[1:]


def test_tool_calls_in_openai_shapes(scripted):
    call = json.dumps({"name": "GetWeather", "arguments": {"city": "Oslo", "unit": "celsius"}})
    session = Scripted(call)
    c = scripted(session)
    out = c.chat.completions.parse(model="m", messages=WEATHER, tools=TOOLS,
                                   tool_choice="required", max_tokens=200)
    assert session.sampling.constraint.field == "tool_choice"
    assert {s["properties"]["name"]["const"] for s in session.sampling.constraint.schema["anyOf"]} \
        == {"GetWeather", "Convert"}
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.choices[0].message.tool_calls[0].function.parsed_arguments == GetWeather(
        city="Oslo", unit="celsius")
    with c.chat.completions.stream(model="m", messages=WEATHER, tools=TOOLS,
                                   max_tokens=200) as stream:  # auto: a call it happened to write
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments.city == "Oslo"
    cut = c.chat.completions.create(model="m", messages=WEATHER, tools=TOOLS,
                                    tool_choice="required", max_tokens=10)
    # cut by max_tokens: no call is made up from half of one
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content == call[:10]


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
])
def test_a_runtime_that_cannot_constrain_is_a_400_naming_the_field(scripted, fields, param):
    """As QNN's runtime today: never an answer that silently ignores the constraint."""
    session = Scripted(constrains=None)
    c = scripted(session)
    with pytest.raises(BadRequestError) as e:
        c.chat.completions.create(model="m", messages=WEATHER, max_tokens=4, **fields)
    assert e.value.param == param and session.sampling is None  # the runtime was never asked


ECHO_RT = '''
import json


class Session:
    eos_token_ids = (0,)
    context_length = 1024
    constrains = "echo"

    def tokenize(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))

    def render_chat(self, messages):
        return ""

    def generate(self, ids, sampling):
        c = sampling.constraint
        yield from (ord(ch) for ch in json.dumps([c.field, c.schema, c.schema_text()]))


def open_session(model_dir, options):
    return Session()
'''


def test_the_constraint_crosses_the_worker_pipe(tmp_path):
    """What a served bundle's runtime gets, in its own process (worker.py / rpc.py): the same
    typed Constraint, and the parent learns the runtime's mechanism."""
    from conftest import stand_in_runner
    from toolkit.runner.core import Constraint, Sampling
    from toolkit.runner.worker import WorkerSession, rpc_command

    runner = stand_in_runner(tmp_path, "echo_rt", ECHO_RT)
    session = WorkerSession(rpc_command(runner=runner, module="echo_rt", model_dir=tmp_path),
                            label="echo_rt")
    try:
        sent = Constraint(GetWeather.model_json_schema(), "tool_choice")
        got = json.loads(session.detokenize(list(session.generate(
            [1], Sampling(max_new_tokens=8, constraint=sent)))))
        assert session.constrains == "echo"
        assert got == [sent.field, sent.schema, sent.schema_text()]
    finally:
        session.close()
