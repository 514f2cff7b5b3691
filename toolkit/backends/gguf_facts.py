"""What a GGUF bundle's files state, for validation's static checks (toolkit/artifact_checks.py):
the GGUF's metadata (context, EOS, special tokens) and the Modelfile Ollama serves it with
(TEMPLATE, stops, num_ctx), which the bundle's own runner never reads.

The Modelfile's TEMPLATE is rendered as Ollama renders it (go_template.py, a documented subset of
Go's text/template) and tokenized by llama.cpp's own tokenizer from the GGUF, without the
whitespace stripping the runner adds to match transformers: Ollama strips nothing, so a template
that writes "\\n" after a control token gives the model a token transformers would not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from ..artifact_checks import ArtifactFacts, Fact, ServedChat, transformers_file_facts
from .go_template import TemplateError, render

MODELFILE = "Modelfile"
_TRIPLE = re.compile(r'"""(.*?)"""', re.S)


def parse_modelfile(text: str) -> dict[str, Any]:
    """{"template": str | None, "system": str | None, "parameters": {name: [values]}}."""
    out: dict[str, Any] = {"template": None, "system": None, "parameters": {}}
    pos, lines = 0, []
    while pos < len(text):  # join triple-quoted values onto their instruction's line
        m = _TRIPLE.search(text, pos)
        end = m.start() if m else len(text)
        lines += text[pos:end].splitlines()
        if not m:
            break
        lines[-1] = (lines[-1] if lines else "") + "\0" + m.group(1)
        pos = m.end()
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        value = rest.split("\0", 1)[1] if "\0" in rest else rest.strip().strip('"')
        if word in ("TEMPLATE", "SYSTEM"):
            out[word.lower()] = value
        elif word == "PARAMETER":
            name, _, v = rest.strip().partition(" ")
            out["parameters"].setdefault(name.lower(), []).append(v.strip().strip('"'))
    return out


def ollama_render(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """The prompt Ollama builds: templates over .Messages once; older ones (.System, .Prompt,
    .Response) once per user turn, concatenated, the last cut after its .Response."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    systems = [m["Content"] for m in msgs if m["Role"] == "system"]
    if ".Messages" in template:
        return render(template, {"Messages": msgs, "System": "\n".join(systems), "Prompt": "",
                                 "Response": ""})
    cut = "\0RESPONSE\0"
    parts, first = [], True
    turns = [m for m in msgs if m["Role"] != "system"]
    for i, m in enumerate(turns):
        if m["Role"] != "user":
            continue
        reply = turns[i + 1]["Content"] if i + 1 < len(turns) else cut
        text = render(template, {"System": "\n".join(systems) if first else "",
                                 "Prompt": m["Content"], "Response": reply})
        parts.append(text.split(cut)[0])
        first = False
    return "".join(parts)


def _gguf_py(path: Path):
    """llama.cpp's own gguf-py (the converter's copy, at `path`), as the converter imports it."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import gguf  # noqa: PLC0415

    return gguf


def gguf_facts(model_dir: Path, gguf_py: Path) -> ArtifactFacts:
    """`gguf_py`: the directory of llama.cpp's gguf-py package."""
    out = transformers_file_facts(model_dir)
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) != 1:
        out.notes.append(f"expected one .gguf file, found {len(files)}: its metadata unchecked")
        return out
    gguf_file = files[0]
    try:
        reader = _gguf_py(gguf_py).GGUFReader(gguf_file, "r")
        meta = {k: f.contents() for k, f in reader.fields.items()
                if not k.endswith((".scores", ".token_type", ".merges"))}
    except Exception as e:  # noqa: BLE001 - gguf-py missing or the file unreadable: say which
        out.notes.append(f"{gguf_file.name}: metadata not read ({type(e).__name__}: {e})")
        return out
    arch = meta.get("general.architecture", "")
    name = gguf_file.name
    for key, claim in ((f"{arch}.context_length", "max_position_embeddings"),
                       (f"{arch}.rope.scaling.original_context_length",
                        "original_max_position_embeddings")):
        if key in meta:
            out.facts.append(Fact(name, key, int(meta[key]), claim))
    if "tokenizer.ggml.eos_token_id" in meta:  # the one llama.cpp (and Ollama) stop on
        out.facts.append(Fact(name, "tokenizer.ggml.eos_token_id",
                              int(meta["tokenizer.ggml.eos_token_id"]), "eos_id"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out.facts.append(Fact(name, "tokenizer.ggml.tokens", {t: i for i, t in enumerate(tokens)},
                          "special_tokens"))
    modelfile = model_dir / MODELFILE
    if modelfile.is_file():
        _modelfile_facts(modelfile, gguf_file, out)
    return out


def _modelfile_facts(path: Path, gguf_file: Path, out: ArtifactFacts) -> None:
    parsed = parse_modelfile(path.read_text(encoding="utf-8"))
    params = parsed["parameters"]
    for value in params.get("num_ctx", []):
        out.facts.append(Fact(MODELFILE, "PARAMETER num_ctx", int(value), "context"))
    template = parsed["template"]
    if template is None:  # Ollama then uses the GGUF's chat template: the runner's path
        return
    tokenize = _llama_tokenizer(gguf_file)

    def render_chat(messages: list[dict[str, str]]) -> str:
        return ollama_render(template, messages, parsed["system"])

    if tokenize is None:
        out.notes.append(f"{MODELFILE} TEMPLATE not compared: llama_cpp does not import here")
        return
    out.chats.append(ServedChat(MODELFILE, "TEMPLATE", render_chat, tokenize,
                                tuple(params.get("stop", []))))


def _llama_tokenizer(gguf_file: Path):
    """llama.cpp's tokenizer of this GGUF (vocabulary only: no weights loaded), special tokens
    parsed, no BOS: transformers' apply_chat_template writes none for Phi-3, and the BOS Ollama
    prepends (the GGUF's add_bos_token) is not the template's."""
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    return tokenize


__all__ = ["gguf_facts", "parse_modelfile", "ollama_render", "TemplateError"]
