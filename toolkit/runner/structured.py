"""Structured output for `run.py serve`: response_format (json_object / json_schema), tools and
tool_choice, read into one typed `Structure`, and the answer in OpenAI's shapes (message.content,
or message.tool_calls with finish_reason "tool_calls"). Standard library only.

Phi-3's chat template has no tool format, so tools are presented in a system turn (TOOLS_INTRO,
then one JSON line per function, then the call format); a chat without tools gets no such turn,
so its prompt and token ids are exactly those of a server without this module. The call format
is one JSON object {"name": ..., "arguments": {...}}: for tool_choice "required" or a named
function the runtime constrains the answer to exactly that (core.Constraint), for "auto" the
answer is free and is a call only when it is exactly such an object for a listed function
(docs/structured-output.md says why).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .core import Constraint

TOOLS_INTRO = ("# Tools\nYou may call one of these functions. Each line is one function as JSON: "
               "its name, its description and the JSON Schema of its arguments.")
CALL_FORMAT = ('To call a function, answer with only this JSON object and nothing else:\n'
               '{"name": "<the function name>", "arguments": {<its arguments>}}\n'
               'A result comes back in a user turn that begins "Result of tool call <id>:".')
RESPONSE_TYPES = ("text", "json_object", "json_schema")


class StructureError(ValueError):
    """A request's structured-output field is malformed: (field, message) for a 400."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def call_schema(self) -> dict[str, Any]:
        """The JSON Schema of one call of this function, in the call format."""
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass(frozen=True)
class Structure:
    """What a request asks of the answer's form. `constraint`: what the runtime must enforce
    (None: free text); `tools`: presented in the prompt; `choice`: "none", "auto", "required"
    or a function's name."""
    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    choice: str = "none"

    @property
    def calls(self) -> bool:
        """Whether the answer may be a tool call."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be a tool call (its text is never content)."""
        return self.calls and self.choice != "auto"


def _schema(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StructureError(field, f"'{field}' must be a JSON Schema object")
    return value


def _response_format(value: Any) -> Constraint | None:
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_TYPES:
        raise StructureError("response_format", "'response_format.type' must be one of "
                             + ", ".join(RESPONSE_TYPES))
    kind = value["type"]
    allowed = {"type"} | ({"json_schema"} if kind == "json_schema" else set())
    extra = sorted(k for k, v in value.items() if v is not None and k not in allowed)
    if extra:
        raise StructureError(f"response_format.{extra[0]}", f"'response_format.{extra[0]}' "
                             f"is not a field of a {kind} response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint({"type": "object"}, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise StructureError("response_format.json_schema", "'response_format.json_schema' "
                             "must be an object with a name and a schema")
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:
        raise StructureError(f"response_format.json_schema.{unknown[0]}",
                             f"'response_format.json_schema.{unknown[0]}' is not supported")
    schema = _schema(spec.get("schema", {}), "response_format.json_schema.schema")
    # strict or not, the answer is constrained to the schema: strict asks for no less
    return Constraint(schema or {"type": "object"}, "response_format")


def _tools(value: Any) -> tuple[Tool, ...]:
    if not isinstance(value, list) or not value:
        raise StructureError("tools", "'tools' must be a non-empty list of functions")
    tools = []
    for i, item in enumerate(value):
        where = f"tools[{i}]"
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(fn, dict):
            raise StructureError(where, f"'{where}' must be {{\"type\": \"function\", "
                                 "\"function\": {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 \
                or not all(c.isalnum() or c in "_-" for c in name):
            raise StructureError(f"{where}.function.name", f"'{where}.function.name' must be "
                                 "1 to 64 letters, digits, '_' or '-'")
        unknown = sorted(k for k, v in fn.items() if v is not None
                         and k not in ("name", "description", "parameters", "strict"))
        if unknown:
            raise StructureError(f"{where}.function.{unknown[0]}",
                                 f"'{where}.function.{unknown[0]}' is not supported")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise StructureError(f"{where}.function.description", f"'{where}.function."
                                 "description' must be a string")
        params = _schema(fn.get("parameters") or {"type": "object", "properties": {}},
                         f"{where}.function.parameters")
        tools.append(Tool(name, description, params))
    if len({t.name for t in tools}) != len(tools):
        raise StructureError("tools", "'tools' names a function twice")
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> str:
    if value in (None, "auto", "none", "required"):
        return value or ("auto" if tools else "none")
    name = (value.get("function") or {}).get("name") if isinstance(value, dict) \
        and value.get("type") == "function" and isinstance(value.get("function"), dict) else None
    if not isinstance(name, str):
        raise StructureError("tool_choice", "'tool_choice' must be none, auto, required or "
                             '{"type": "function", "function": {"name": ...}}')
    if name not in {t.name for t in tools}:
        raise StructureError("tool_choice", f"'tool_choice' names {name!r}, which is not in "
                             "'tools'")
    return name


def parse_structure(fields: dict[str, Any]) -> Structure:
    """response_format, tools, tool_choice and parallel_tool_calls of a chat request."""
    fmt = _response_format(fields["response_format"]) if "response_format" in fields else None
    tools = _tools(fields["tools"]) if "tools" in fields else ()
    if "tool_choice" in fields and not tools:
        raise StructureError("tool_choice", "'tool_choice' needs 'tools'")
    parallel = fields.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):  # either way an answer holds at most one call
        raise StructureError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    choice = _tool_choice(fields.get("tool_choice"), tools)
    if choice in ("auto", "none"):
        return Structure(fmt, tools if choice == "auto" else (), choice)
    if fmt is not None:
        raise StructureError("response_format", "'response_format' cannot constrain an answer "
                             f"that tool_choice {choice!r} makes a tool call")
    chosen = [t for t in tools if choice in ("required", t.name)]
    schema = (chosen[0].call_schema() if len(chosen) == 1
              else {"anyOf": [t.call_schema() for t in chosen]})
    return Structure(Constraint(schema, "tool_choice"), tools, choice)


def present_tools(turns: list[dict[str, str]], structure: Structure) -> list[dict[str, str]]:
    """The turns with the tools' system block (none when no tool may be called): appended to
    the first system turn, else a system turn of its own before the others."""
    if not structure.calls:
        return turns
    lines = [json.dumps({"name": t.name, "description": t.description,
                         "parameters": t.parameters}) for t in structure.tools]
    block = "\n".join([TOOLS_INTRO, *lines, CALL_FORMAT])
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{block}"}, *turns[1:]]
    return [{"role": "system", "content": block}, *turns]


def assistant_calls_text(calls: Any, where: str) -> str:
    """An assistant turn's tool_calls as the model wrote them (the call format), one per line."""
    if not isinstance(calls, list) or not calls:
        raise StructureError(f"{where}.tool_calls", f"{where}.tool_calls must be a non-empty "
                             "list")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        try:
            name, args = fn["name"], json.loads(fn["arguments"])
            if not isinstance(name, str):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise StructureError(f"{where}.tool_calls[{i}]", f"{where}.tool_calls[{i}] must be "
                                 "a function call with a name and JSON arguments") from None
        out.append(json.dumps({"name": name, "arguments": args}))
    return "\n".join(out)


def tool_call(text: str, structure: Structure) -> dict[str, Any] | None:
    """The answer as OpenAI's tool call when it is one call of a listed function, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"} \
            or value["name"] not in {t.name for t in structure.tools} \
            or not isinstance(value["arguments"], dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])}}


def answer(text: str, finish: str, structure: Structure) -> tuple[dict[str, Any], str]:
    """(the assistant message, finish_reason). An answer cut by max_tokens is never a call:
    its text is the content and the reason stays "length"."""
    call = tool_call(text, structure) if structure.calls and finish != "length" else None
    if call is None:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def may_be_call(text: str, structure: Structure) -> bool:
    """Whether a streamed answer's text so far could still become a tool call (and so is held
    back): always for a forced call, for "auto" while it is blank or starts with '{'."""
    if not structure.calls:
        return False
    return structure.forced or not text.strip() or text.lstrip().startswith("{")
