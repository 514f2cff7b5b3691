"""Eval sets: JSONL, one row per line, each with an `id` and exactly one of
  text      teacher-forced: logits compared at every position
  prompt    plain-text prompt for greedy generation
  messages  chat turns ([{role, content}]) rendered through the model's chat template
and, on a text row, `"reach_context": true`: the text is cut at the recipe's context_length
instead of eval.max_tokens, so teacher-forced positions reach as far as the bundle claims to
serve (one long row: one prefill, every position's KLD up to the end of the context).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PhikitError
from .runner.trust import BundleError, read_regular

KINDS = ("text", "prompt", "messages")
# Bounds on what one eval set may make phikit read: a row of a 128k-token context is about
# 0.5 MB of text, so these are far above any honest set and far below a file that would take
# the build's memory (every row is held, tokenized and run through two models).
MAX_EVALSET_BYTES = 256 << 20
MAX_ROW_BYTES = 8 << 20
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class EvalRow:
    id: str
    kind: str  # one of KINDS
    value: str | tuple  # text / prompt, or messages as a tuple of (role, content)
    reach_context: bool = False  # a text cut at the context length, not eval.max_tokens

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.value]


@dataclass(frozen=True)
class EvalSet:
    path: Path
    sha256: str
    rows: tuple[EvalRow, ...]

    @property
    def texts(self) -> list[EvalRow]:
        return [r for r in self.rows if r.kind == "text"]

    @property
    def prompts(self) -> list[EvalRow]:
        return [r for r in self.rows if r.kind != "text"]


def _row(path: Path, lineno: int, raw: str) -> EvalRow:
    def fail(msg: str, field: str | None = None) -> PhikitError:
        return PhikitError(msg, file=path, line=lineno, field=field)

    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise fail(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise fail("expected a JSON object")
    unknown = set(obj) - {"id", "reach_context", *KINDS}
    if unknown:
        raise fail("unknown field", field=sorted(unknown)[0])
    kinds = [k for k in KINDS if k in obj]
    if len(kinds) != 1:
        raise fail(f"needs exactly one of {', '.join(KINDS)}")
    kind = kinds[0]
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise fail("must be a non-empty string", field="id")
    value = obj[kind]
    if kind == "messages":
        if not isinstance(value, list) or not value:
            raise fail("must be a non-empty list of {role, content}", field="messages")
        turns = []
        for i, m in enumerate(value):
            if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES
                    or not isinstance(m["content"], str)):
                raise fail(f"each turn is {{role: {'|'.join(sorted(ROLES))}, content: str}}",
                           field=f"messages[{i}]")
            turns.append((m["role"], m["content"]))
        value = tuple(turns)
    elif not isinstance(value, str) or not value:
        raise fail("must be a non-empty string", field=kind)
    reach = obj.get("reach_context", False)
    if not isinstance(reach, bool) or (reach and kind != "text"):
        raise fail("true or false, on a text row only", field="reach_context")
    return EvalRow(obj["id"], kind, value, reach)


def load_evalset(path: str | Path, limit: int | None = None) -> EvalSet:
    path = Path(path)
    try:
        data = read_regular(path, MAX_EVALSET_BYTES)
    except BundleError as e:  # not a regular file (a FIFO would hang the build), or too large
        raise PhikitError(f"cannot read eval set: {str(e).removeprefix(f'{path}: ')}",
                          file=path) from None
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PhikitError(f"not UTF-8 text (byte {e.start})", file=path, line=line) from None
    rows, seen = [], set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        if len(raw) > MAX_ROW_BYTES:
            raise PhikitError(f"row longer than {MAX_ROW_BYTES >> 20} MiB", file=path,
                              line=lineno)
        if raw.strip():
            row = _row(path, lineno, raw)
            if row.id in seen:
                raise PhikitError(f"duplicate id {row.id!r}", file=path, line=lineno, field="id")
            seen.add(row.id)
            rows.append(row)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise PhikitError("eval set has no rows", file=path)
    return EvalSet(path, hashlib.sha256(data).hexdigest(), tuple(rows))
