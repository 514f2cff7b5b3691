"""Static checks (toolkit/artifact_checks.py) and the Ollama Modelfile path (issue 37): what the
files of a bundle state against what it claims, and the Modelfile's TEMPLATE rendered as Ollama
renders it. The planted-defect suite (tests/defects, claim_planters.py) runs them on real bundles;
these tests pin the pieces on small inputs, each compared with what transformers produces."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO
from toolkit.artifact_checks import (ArtifactFacts, Fact, ServedChat, reference_claims,
                                     static_checks, transformers_file_facts)
from toolkit.backends.go_template import TemplateError, render
from toolkit.backends.gguf import PHI3_TEMPLATE, STOPS
from toolkit.backends.gguf_facts import ollama_render, parse_modelfile
from toolkit.errors import PhikitError
from toolkit.evalset import load_evalset

TINY = REPO / "models" / "tiny-phi3"
CHATS = [
    [{"role": "user", "content": "What does os.sep hold?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "A?"},
     {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY))


def reference_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def test_go_template_subset():
    messages = [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "U"}]
    assert render(PHI3_TEMPLATE, {"Messages": messages}) == \
        "<|system|>S<|end|><|user|>U<|end|><|assistant|>"
    branches = ('{{- range $i, $m := .Messages }}{{ if eq $m.Role "system" }}S{{ else if '
                'eq .Role "user" }}U{{ else }}A{{ end }}{{ $i }}{{ end }}/{{ len $.Messages }}')
    assert render(branches, {"Messages": messages + [{"Role": "assistant", "Content": ""}]}) == \
        "S0U1A2/3"
    legacy = '{{ if .System }}[{{ .System }}]{{ end }}{{ .Prompt }} -> {{ .Response }}'
    assert render(legacy, {"System": "", "Prompt": "p", "Response": "r"}) == "p -> r"
    with pytest.raises(TemplateError, match="unsupported"):
        render('{{ template "x" }}', {})
    with pytest.raises(TemplateError, match="has no"):
        render("{{ if .System }}x", {})


def test_modelfile_parses_as_written():
    text = ('FROM ./model.gguf\nTEMPLATE """{{ .Prompt }}\nline two"""\n'
            'PARAMETER stop "<|end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER num_ctx 2048\n')
    parsed = parse_modelfile(text)
    assert parsed["template"] == "{{ .Prompt }}\nline two"
    assert parsed["parameters"] == {"stop": ["<|end|>", "<|endoftext|>"], "num_ctx": ["2048"]}


def test_shipped_modelfile_template_renders_like_transformers(hf_tokenizer):
    """phikit's Modelfile TEMPLATE, tokenized without the runner's whitespace stripping (as
    Ollama's llama.cpp tokenizer does), is the reference's apply_chat_template, system and
    multi-turn chats included. The tokenizer here: the checkpoint's, with the strip flags of
    its special tokens off (what llama.cpp does not apply)."""
    tokenizers = pytest.importorskip("tokenizers")
    data = json.loads((TINY / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        t["rstrip"] = t["lstrip"] = False
    raw = tokenizers.Tokenizer.from_str(json.dumps(data))
    for messages in CHATS:
        text = ollama_render(PHI3_TEMPLATE, messages, None)
        assert raw.encode(text, add_special_tokens=False).ids == \
            reference_ids(hf_tokenizer, messages), text
    # the same chats through a template that writes "\n" after each role marker (transformers'
    # own spelling, which its rstrip flags absorb and llama.cpp does not): not the same ids
    newline = PHI3_TEMPLATE.replace("|>{{ .Content }}", "|>\n{{ .Content }}")
    text = ollama_render(newline, CHATS[0], None)
    assert raw.encode(text, add_special_tokens=False).ids != reference_ids(hf_tokenizer,
                                                                           CHATS[0])


def claims(context: int | None = 2048):
    return reference_claims(TINY, context, [32000, 32001, 32007])


def metric(found, name):
    return next(c for c in found if c["metric"] == name)


def test_reference_claims_from_the_checkpoint():
    c = claims()
    assert (c.context, c.eos) == (2048, (32000, 32001, 32007))
    assert c.turn_ends == ("<|end|>",)  # where Phi-3's template closes a message
    assert c.specials["<|end|>"] == 32007
    assert claims(None).context == 4096  # no recipe context: the checkpoint's maximum


def test_static_checks_name_file_and_field(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY, model, ignore=shutil.ignore_patterns("*.safetensors"))
    honest = transformers_file_facts(model)
    found = static_checks(honest, claims(), [])
    assert [c["passed"] for c in found] == [True] * len(found)
    assert {c["metric"] for c in found} == {"context_agreement", "eos_ids_kept",
                                            "special_token_ids"}

    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (model / "config.json").write_text(json.dumps(config))
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [32000, 32007]
    (model / "generation_config.json").write_text(json.dumps(gen))
    facts = transformers_file_facts(model)
    facts.facts.append(Fact("runtime", "context_length", 1024, "context"))
    found = static_checks(facts, claims(), [])
    ctx, eos = metric(found, "context_agreement"), metric(found, "eos_ids_kept")
    assert not ctx["passed"] and "config.json max_position_embeddings = 2048" in ctx["detail"]
    assert not eos["passed"] and "lost EOS ids [32001]" in eos["detail"]
    runtime = static_checks(ArtifactFacts([Fact("runtime", "context_length", 1024, "context")]),
                            claims(), [])
    assert "the runtime serves 1024 tokens, the bundle claims 2048" in runtime[0]["detail"]


def test_served_template_and_stops(hf_tokenizer):
    tokenize = lambda text: hf_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa
    chats = [(f"c{i}", m, reference_ids(hf_tokenizer, m)) for i, m in enumerate(CHATS)]

    def served(template: str, stops=STOPS) -> list[dict]:
        chat = ServedChat("Modelfile", "TEMPLATE", lambda m: ollama_render(template, m, None),
                          tokenize, tuple(stops))
        return static_checks(ArtifactFacts(chats=[chat]), claims(), chats)

    assert all(c["passed"] for c in served(PHI3_TEMPLATE))
    broken = served(PHI3_TEMPLATE.replace("<|{{ .Role }}|>", '<|{{ if eq .Role "system" }}user'
                                          '{{ else }}{{ .Role }}{{ end }}|>'))
    check = metric(broken, "served_template_agreement")
    assert check["measured"] == pytest.approx(1 / 3)  # the two chats with a system turn
    assert "Modelfile TEMPLATE renders chat 'c1' differently at token 0" in check["detail"]
    stops = metric(served(PHI3_TEMPLATE, stops=["<|endoftext|>"]), "served_stops")
    assert not stops["passed"] and "no stop '<|end|>'" in stops["detail"]
    bad = metric(served("{{ template \"x\" }}"), "served_template_agreement")
    assert bad["measured"] == 0 and "does not render" in bad["detail"]


def test_reach_context_rows(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"id": "a", "text": "x", "reach_context": true}\n')
    assert load_evalset(path).rows[0].reach_context
    path.write_text('{"id": "a", "prompt": "x", "reach_context": true}\n')
    with pytest.raises(PhikitError, match="field 'reach_context'"):
        load_evalset(path)


def test_builtin_eval_sets_take_every_chat_path():
    """System turns and multi-turn histories: a template's system or assistant branch is on the
    validated path; tiny-phi3's set has a row that reaches its recipes' 2048-token context."""
    for name in ("tiny-phi3.jsonl", "tiny-phi3-long.jsonl"):
        chats = [r.messages for r in load_evalset(REPO / "evalsets" / name).rows
                 if r.kind == "messages"]
        assert any(m[0]["role"] == "system" for m in chats), name
        assert any(sum(t["role"] == "user" for t in m) > 1 for m in chats), name
    assert any(r.reach_context for r in load_evalset(REPO / "evalsets" / "tiny-phi3.jsonl").rows)


class _ShortSession:
    """A runtime that computes the reference model exactly but serves fewer positions than the
    eval text (a context halved in its config)."""

    def __init__(self, logits, context_length):
        self.table, self.context_length = logits, context_length

    def logits(self, ids, start=0):
        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the model's context length")
        return self.table[:len(ids)][start:]

    def tokenize(self, text, add_special_tokens=True):
        return list(range(10))

    def detokenize(self, ids):
        return "x"


def test_a_text_past_the_served_context_is_measured_where_it_is_served():
    """The runtime's short context is a static failure (context_agreement), not a crash of the
    teacher-forced pass: parity measures the positions the runtime serves."""
    import numpy as np

    from toolkit.runner import parity_core
    from toolkit.runner.logprobs import log_softmax
    from toolkit.runner.reference_data import Reference, TextRef

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 16)).astype(np.float32)
    logp = log_softmax(logits)
    top = np.argsort(-logp, axis=-1)[:, :8]
    ids = np.arange(10, dtype=np.int32)
    text = TextRef("long", ids, top.astype(np.int32),
                   np.take_along_axis(logp, top, -1).astype(np.float32),
                   logp[np.arange(9), ids[1:]].astype(np.float32))
    row = type("Row", (), {"value": "x", "kind": "text"})()
    tf = parity_core.teacher_forced(_ShortSession(logits, 6), Reference([text], [], {}),
                                    {"long": row})
    assert tf.rows[0]["tokens"] == 6 and tf.klds[0].max() < 1e-6 and not tf.mismatches
