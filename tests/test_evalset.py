"""Eval-set files: each bad row is reported with its file and line."""

from __future__ import annotations

import pytest

from conftest import REPO
from toolkit.errors import PhikitError
from toolkit.evalset import load_evalset


def test_shipped_evalset_has_every_kind():
    ev = load_evalset(REPO / "evalsets" / "tiny-phi3.jsonl")
    kinds = {r.kind for r in ev.rows}
    assert kinds == {"text", "prompt", "messages"}
    assert len(ev.texts) >= 8 and len(ev.prompts) >= 8
    assert len(ev.sha256) == 64


@pytest.mark.parametrize("row, message", [
    ('{"id": "a", "text": "x", "prompt": "y"}', "exactly one of"),
    ('{"id": "a"}', "exactly one of"),
    ('{"id": "", "text": "x"}', "field 'id'"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "x"}]}', "field 'messages[0]'"),
    ('{"id": "a", "text": "x", "colour": 1}', "field 'colour': unknown field"),
    ('{"id": "a", "text": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_rows(tmp_path, row, message):
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\n' + row + "\n")
    with pytest.raises(PhikitError) as e:
        load_evalset(path)
    assert str(e.value).startswith(f"{path}:2:") and message in str(e.value)


def test_duplicate_ids(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(PhikitError, match=r":3: field 'id': duplicate id"):
        load_evalset(path)


def test_limit(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "text": "t{i}"}}\n' for i in range(5)))
    assert [r.id for r in load_evalset(path, limit=2).rows] == ["r0", "r1"]
