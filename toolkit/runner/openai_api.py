"""OpenAI's request and response shapes for `run.py serve` (server.py is the HTTP side): every
request field honoured or a 400 naming it, messages through the chat template, one completion's
text pieces, stop strings, finish reason and usage. Standard library only.

HONOURED and INERT list the fields per endpoint; anything else (logit_bias, a penalty, an
unknown field) is a 400 naming it, never silently ignored. response_format, tools
and tool_choice are structured.py's; a runtime that cannot constrain its output gets a 400
naming the field that asked for it.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

from .core import Sampling, Session, TextStream, chat_ids
from .structured import (Structure, StructureError, answer, assistant_calls_text, may_be_call,
                         parse_structure, present_tools)

MAX_BODY = 1 << 20  # bytes
MAX_SEED = 2**63 - 1
# No token of a Phi-3 vocabulary spells more characters than this (the longest are runs of
# whitespace): a prompt longer than context_length * MAX_CHARS_PER_TOKEN cannot fit and is
# refused before it is tokenized, the expensive part (a 1 MB chat of `<|end|>` spellings held
# the model 10.6 s only to learn that it was too long).
MAX_CHARS_PER_TOKEN = 16
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
# it spells out a default (n=1, presence_penalty=0, logit_bias {}). Any other field or value
# is a 400 naming it, so that no client believes a setting took effect that this server
# ignores (logit_bias, a penalty, functions, ...).
# A null is the field left out, as in OpenAI's API.
_HONOURED_BOTH = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                  "stream_options", "user"}  # user: an end-user id for the caller's records
HONOURED = {"chat": _HONOURED_BOTH | {"messages", "max_completion_tokens", "response_format",
                                      "tools", "tool_choice", "parallel_tool_calls",
                                      "logprobs", "top_logprobs"},
            "completions": _HONOURED_BOTH | {"prompt"}}
_INERT_BOTH = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
INERT = {"chat": {**_INERT_BOTH, "store": False},
         "completions": {**_INERT_BOTH, "echo": False, "best_of": 1}}
STREAM_OPTIONS = {"include_usage"}
# Message fields by role (nulls aside); a tool result is shown to the model as a user turn
MESSAGE_FIELDS = {"system": {"role", "content"}, "developer": {"role", "content"},
                  "user": {"role", "content"}, "assistant": {"role", "content", "tool_calls"},
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
        if role == "assistant" and m.get("tool_calls") is not None:
            try:  # the calls as the model wrote them, after any text
                calls = assistant_calls_text(m["tool_calls"], where)
            except StructureError as e:
                raise ApiError(400, str(e), param=e.field) from None
            content = f"{content}\n{calls}" if content else calls
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
    try:
        structure = parse_structure(fields) if chat else Structure()
    except StructureError as e:
        raise ApiError(400, str(e), param=e.field) from None
    return {
        "chat": chat,
        "structure": structure,
        "logprobs": _logprobs(fields) if chat else None,
        "messages": present_tools(_messages(fields), structure) if chat else None,
        "prompt": None if chat else _prompt(fields),
        "stream": _boolean(fields, "stream"),
        "include_usage": _stream_options(fields),
        "stop": stop or [],
        "sampling": Sampling(
            max_new_tokens=_number(fields, budget, 256, 1, 1 << 20, int),
            temperature=_number(fields, "temperature", 0.0, 0, 2),
            top_p=_number(fields, "top_p", 1.0, 0, 1), seed=seed,
            constraint=structure.constraint),
    }


def _logprobs(fields: dict) -> int | None:
    """How many top_logprobs per token, when logprobs is asked for (else None)."""
    if not _boolean(fields, "logprobs"):
        if "top_logprobs" in fields:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    if _boolean(fields, "stream"):
        # they are computed from the whole answer's logits (Generation.logprobs), after it
        raise ApiError(400, "'logprobs' is not supported with 'stream': true by this server",
                       param="logprobs", code="unsupported_parameter")
    return _number(fields, "top_logprobs", 0, 0, 20, int)


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
        constraint = self.sampling.constraint
        if constraint is not None and not getattr(session, "constrains", None):
            raise ApiError(400, f"'{constraint.field}' needs constrained decoding, which this "
                           "server's runtime does not have", param=constraint.field,
                           code="unsupported_parameter")
        if request.get("logprobs") is not None and not hasattr(session, "logits"):
            raise ApiError(400, "'logprobs': this server's runtime gives no logits",
                           param="logprobs", code="unsupported_parameter")
        self.tokens: list[int] = []
        self._tokens = self._first_token_checked() if constraint is not None else None
        self.finish_reason = "stop"

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def _first_token_checked(self) -> Iterator[int]:
        """The generation, started: a schema the runtime's grammar engine rejects fails its
        first token, which must be a 400 before any streamed header, not a broken stream."""
        field = self.sampling.constraint.field
        tokens = self.session.generate(self.prompt_ids, self.sampling)
        try:
            first = next(tokens, None)
        except ValueError as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ApiError(400, f"'{field}' cannot be enforced by this runtime: {why}",
                           param=field, code="unsupported_value") from None
        return itertools.chain(() if first is None else (first,), tokens)

    def pieces(self) -> Iterator[str]:
        stops, stream = self.request["stop"], TextStream(self.session)
        text, sent = "", 0
        longest = max((len(s) for s in stops), default=0)
        tokens, self._tokens = self._tokens, None
        for token in tokens or self.session.generate(self.prompt_ids, self.sampling):
            self.tokens.append(token)
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

    def choice(self) -> dict[str, Any]:
        """The whole answer as a response's choice (chat: message, maybe tool_calls)."""
        text = "".join(self.pieces())
        if not self.request["chat"]:
            return {"index": 0, "text": text, "logprobs": None,
                    "finish_reason": self.finish_reason}
        message, finish = answer(text, self.finish_reason, self.request["structure"])
        choice = {"index": 0, "message": message, "finish_reason": finish}
        if self.request.get("logprobs") is not None:
            choice["logprobs"] = {"content": self.logprobs(self.request["logprobs"]),
                                  "refusal": None}
        return choice

    def logprobs(self, top: int) -> list[dict[str, Any]]:
        """OpenAI's logprobs.content of the generated tokens: the model's log-probabilities (no
        temperature, no constraint mask), from one teacher-forced pass over prompt + answer
        (Session.logits, what validation compares), so that every runtime gives them alike."""
        from .logprobs import chosen_and_top

        if not self.tokens:
            return []
        ids = self.prompt_ids + self.tokens[:-1]
        rows = self.session.logits(ids, start=len(self.prompt_ids) - 1)

        def entry(before: int, token: int, logprob: float) -> dict[str, Any]:
            # decoded after the token before it, as TextStream does: SentencePiece drops a
            # token's leading space when it is decoded alone
            text = self.session.detokenize([before, token])[
                len(self.session.detokenize([before])):]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        befores = [self.prompt_ids[-1], *self.tokens[:-1]]
        return [{**entry(before, token, lp),
                 "top_logprobs": [entry(before, t, p) for t, p in best]}
                for before, token, (lp, best) in zip(befores, self.tokens,
                                                     chosen_and_top(rows, self.tokens, top))]

    def events(self) -> Iterator[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) per streamed chunk: the role, content pieces, a tool call
        (its id and name, then its arguments), and last an empty delta with the finish reason.
        An answer that may still become a tool call is held back until it is known."""
        structure, chat = self.request["structure"], self.request["chat"]
        if chat:
            yield {"role": "assistant", "content": ""}, None
        held: str | None = ""
        pieces = self.pieces()
        try:
            for piece in pieces:
                if held is not None:
                    held += piece
                    if may_be_call(held, structure):
                        continue
                    piece, held = held, None
                yield {"content": piece}, None
        finally:
            pieces.close()  # stops the runtime's generator: frees the model for the queue
        if held is None or not chat:
            yield {}, self.finish_reason
            return
        message, finish = answer(held, self.finish_reason, structure)
        for call in message.get("tool_calls", []):
            fn = call["function"]
            yield {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                   "function": {"name": fn["name"], "arguments": ""}}]}, None
            yield {"tool_calls": [{"index": 0, "function": {"arguments": fn["arguments"]}}]}, None
        if message["content"]:
            yield {"content": message["content"]}, None
        yield {}, finish

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids),
                "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens}
