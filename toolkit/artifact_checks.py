"""Static checks: what every file a runtime reads says, against what the bundle claims.

Parity measures what the bundle's runner computes; a serving front end may read other files of
the same artifact (Ollama reads the Modelfile and the GGUF's metadata, not the runner's
generation_config), and some facts never show in a forward pass (a halved context length, an EOS
id lost from a set the eval's generations never reach). Each backend lists the facts its files
state (`Backend.artifact_facts`, backends/common.py's default reads the transformers-format
files); this module compares them with the reference, backend-blind, and adds one named check per
kind to the parity report (a share that must be 1.0, with a one-line detail naming file and field):

  context_agreement          every context-length field = the claimed context (recipe
                             context_length, else the checkpoint's max_position_embeddings), or the
                             checkpoint's own max / original length where the field records that;
                             the runtime serves at least the claimed context
  eos_ids_kept               every EOS set (the runtime's, each file's) holds every id of the
                             reference generation_config's; a single eos id is one of them
  special_token_ids          every special token of the reference tokenizer has its id in each
                             artifact tokenizer
  served_template_agreement  a chat template some front end renders itself (the Modelfile's
                             TEMPLATE), tokenized as that front end does, gives the reference's
                             apply_chat_template ids for every eval chat (system, multi-turn)
  served_stops               that front end's stop strings hold the reference's end-of-turn EOS
                             spellings (<|end|>)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# what a Fact's value must equal or contain
CLAIMS = ("context", "max_position_embeddings", "original_max_position_embeddings", "eos_set",
          "eos_id", "special_tokens")


@dataclass(frozen=True)
class Fact:
    file: str  # relative to the model dir, or "runtime" for what the loaded session reports
    field: str
    value: Any
    claim: str  # one of CLAIMS


@dataclass(frozen=True)
class ServedChat:
    """A chat template a front end renders by itself, outside the runner."""
    file: str
    template: str  # where in the file: "TEMPLATE"
    render: Callable[[list[dict[str, str]]], str]  # messages -> the text the front end tokenizes
    tokenize: Callable[[str], list[int]]  # as that front end tokenizes it (BOS included)
    stops: tuple[str, ...] = ()


@dataclass
class ArtifactFacts:
    facts: list[Fact] = field(default_factory=list)
    chats: list[ServedChat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be read, and why


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eos_list(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else [int(v) for v in value or []]


def tokenizer_specials(tokenizer_json: dict | None) -> dict[str, int]:
    """content -> id of the special added tokens of a tokenizer.json."""
    return {t["content"]: int(t["id"]) for t in (tokenizer_json or {}).get("added_tokens", [])
            if t.get("special")}


def transformers_file_facts(model_dir: Path) -> ArtifactFacts:
    """The facts of config.json, generation_config.json and tokenizer.json where present."""
    out = ArtifactFacts()
    config = _json(model_dir / "config.json")
    if config:
        for key in ("max_position_embeddings", "original_max_position_embeddings"):
            if isinstance(config.get(key), int):
                out.facts.append(Fact("config.json", key, config[key], key))
        if config.get("eos_token_id") is not None:
            out.facts.append(Fact("config.json", "eos_token_id", config["eos_token_id"],
                                  "eos_id" if isinstance(config["eos_token_id"], int)
                                  else "eos_set"))
    gen = _json(model_dir / "generation_config.json")
    if gen and gen.get("eos_token_id") is not None:
        out.facts.append(Fact("generation_config.json", "eos_token_id",
                              eos_list(gen["eos_token_id"]), "eos_set"))
    tok = _json(model_dir / "tokenizer.json")
    if tok:
        out.facts.append(Fact("tokenizer.json", "added_tokens",
                              {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])},
                              "special_tokens"))
    return out


@dataclass(frozen=True)
class Claims:
    """What the bundle claims, from the recipe and the reference checkpoint."""
    context: int
    context_from: str
    config: dict
    eos: tuple[int, ...]
    specials: dict[str, int]
    turn_ends: tuple[str, ...]  # EOS spellings the reference template closes a message with


def reference_claims(checkpoint: Path, context_length: int | None,
                     eos: Sequence[int]) -> Claims:
    config = _json(checkpoint / "config.json") or {}
    specials = tokenizer_specials(_json(checkpoint / "tokenizer.json"))
    context = context_length or int(config.get("max_position_embeddings") or 0)
    spelled = {i: s for s, i in specials.items()}
    eos_spellings = [spelled[i] for i in eos if i in spelled]
    return Claims(context, "recipe context_length" if context_length
                  else "the checkpoint's max_position_embeddings", config, tuple(eos), specials,
                  turn_end_spellings(checkpoint, eos_spellings))


def turn_end_spellings(checkpoint: Path, eos_spellings: list[str]) -> tuple[str, ...]:
    """The EOS spellings the reference chat template writes right after a message's content (a
    reply ends there): Phi-3's <|end|>. Every EOS spelling where the template cannot be read."""
    template = None
    jinja = checkpoint / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    else:
        template = (_json(checkpoint / "tokenizer_config.json") or {}).get("chat_template")
    if not isinstance(template, str):
        return tuple(eos_spellings)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    marker = "\x00MARK\x00"
    try:
        text = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            template).render(messages=[{"role": "user", "content": marker},
                                       {"role": "assistant", "content": marker}],
                             add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - a template this renderer does not take: check them all
        return tuple(eos_spellings)
    after = [part.lstrip() for part in text.split(marker)[1:]]
    ends = tuple(s for s in eos_spellings if any(a.startswith(s) for a in after))
    return ends or tuple(eos_spellings)


def _check(metric: str, agreeing: int, total: int, first: str) -> dict[str, Any]:
    ok = agreeing == total
    return {"metric": metric, "measured": agreeing / total, "bound": 1.0, "kind": "min",
            "passed": ok, "detail": "" if ok else f"{total - agreeing} of {total} disagree; "
                                                  f"first: {first}"}


def _fact_problem(fact: Fact, claims: Claims) -> str | None:
    where = f"{fact.file} {fact.field}"
    if fact.claim == "context":
        if fact.file == "runtime":
            if int(fact.value) < claims.context:
                return (f"the runtime serves {fact.value} tokens, the bundle claims "
                        f"{claims.context} ({claims.context_from})")
            return None
        if int(fact.value) != claims.context:
            return (f"{where} = {fact.value}, the bundle claims {claims.context} "
                    f"({claims.context_from})")
    elif fact.claim in ("max_position_embeddings", "original_max_position_embeddings"):
        want = claims.config.get(fact.claim)
        if want is not None and int(fact.value) != int(want):
            return f"{where} = {fact.value}, the checkpoint's {fact.claim} is {want}"
    elif fact.claim == "eos_set":
        lost = [i for i in claims.eos if i not in eos_list(fact.value)]
        if lost:
            return (f"{where} = {eos_list(fact.value)} lost EOS ids {lost} of the reference's "
                    f"{list(claims.eos)} (generation_config.json)")
    elif fact.claim == "eos_id":
        if claims.eos and int(fact.value) not in claims.eos:
            return f"{where} = {fact.value}, not one of the reference's EOS ids {list(claims.eos)}"
    elif fact.claim == "special_tokens":
        wrong = [(s, i, fact.value.get(s)) for s, i in claims.specials.items()
                 if fact.value.get(s) != i]
        if wrong:
            s, i, got = wrong[0]
            return (f"{where}: {s!r} is id {got}, the reference tokenizer's is {i} "
                    f"({len(wrong)} special tokens differ)")
    return None


CHECK_OF = {"context": "context_agreement", "max_position_embeddings": "context_agreement",
            "original_max_position_embeddings": "context_agreement", "eos_set": "eos_ids_kept",
            "eos_id": "eos_ids_kept", "special_tokens": "special_token_ids"}


# the checks static_checks adds (a device's `run.py validate` measures parity only: it has
# the artifact but not the checkpoint's files these compare with)
STATIC_METRICS = (*dict.fromkeys(CHECK_OF.values()), "served_template_agreement", "served_stops")


def static_checks(facts: ArtifactFacts, claims: Claims, chats: list[tuple[str, list, list[int]]]
                  ) -> list[dict[str, Any]]:
    """The report's static checks. `chats`: (row id, messages, reference ids) of each eval chat."""
    out = []
    for metric in dict.fromkeys(CHECK_OF.values()):
        mine = [f for f in facts.facts if CHECK_OF[f.claim] == metric]
        if not mine:
            continue
        problems = [p for p in (_fact_problem(f, claims) for f in mine) if p]
        out.append(_check(metric, len(mine) - len(problems), len(mine),
                          problems[0] if problems else ""))
    if facts.chats and chats:
        pairs, bad = 0, []
        for served in facts.chats:
            for row_id, messages, ref_ids in chats:
                pairs += 1
                try:
                    got = served.tokenize(served.render(messages))
                except ValueError as e:  # go_template.TemplateError: outside its subset
                    bad.append(f"{served.file} {served.template} does not render chat {row_id!r}: {e}")
                    continue
                if got != ref_ids:
                    i = next((k for k, (a, b) in enumerate(zip(got, ref_ids)) if a != b),
                             min(len(got), len(ref_ids)))
                    bad.append(f"{served.file} {served.template} renders chat {row_id!r} differently at token {i}: "
                               f"reference {ref_ids[i:i + 4]} vs served {got[i:i + 4]}")
        out.append(_check("served_template_agreement", pairs - len(bad), pairs,
                          bad[0] if bad else ""))
    if facts.chats and claims.turn_ends:
        need = [(s, end) for s in facts.chats for end in claims.turn_ends]
        missing = [f"{s.file} has no stop {end!r}: replies run through the end of their turn"
                   for s, end in need if end not in s.stops]
        out.append(_check("served_stops", len(need) - len(missing), len(need),
                          missing[0] if missing else ""))
    return out
