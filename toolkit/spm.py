"""A SentencePiece `tokenizer.model` from a Llama-style `tokenizer.json` (BPE with byte fallback).

Real Phi-3 checkpoints ship both files; a checkpoint that ships only tokenizer.json (our tiny
fixtures, many fine-tunes) cannot go through llama.cpp's Phi-3 converter, which reads the
SentencePiece model. The proto is written with sentencepiece's own protobuf classes.

Why minus the merge rank: SentencePiece's BPE encoder repeatedly merges the adjacent pair whose
concatenation has the highest score, which is exactly HF BPE's "lowest merge rank first" when
score = -rank. Single characters (never a merge result) rank after every merge; control, unknown
and byte pieces score 0, as in the published Llama/Phi-3 models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class UnsupportedTokenizer(ValueError):
    """tokenizer.json is not a Llama-style byte-fallback BPE (say which part)."""


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer).
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def model_proto_from_tokenizer_json(tokenizer_json: Path) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise UnsupportedTokenizer(f"{tokenizer_json}: model.type must be BPE with byte_fallback "
                                   f"(found {model.get('type')!r})")
    normalizers = (tok.get("normalizer") or {}).get("normalizers") or [tok.get("normalizer") or {}]
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers)
    metaspace = tok.get("pre_tokenizer") or {}
    if not prepend and metaspace.get("type") == "Metaspace":
        prepend = metaspace.get("prepend_scheme", "always") != "never"

    vocab: dict[str, int] = model["vocab"]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UnsupportedTokenizer(f"{tokenizer_json}: model.vocab ids are not 0..{len(by_id) - 1}")
    rank = {}
    for r, (a, b) in enumerate(_merge_pairs(model.get("merges", []))):
        rank.setdefault(a + b, r)
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    unk = model.get("unk_token")

    proto = spm_pb2.ModelProto()
    P = spm_pb2.ModelProto.SentencePiece
    for piece, _ in by_id:
        sp = proto.pieces.add()
        sp.piece = piece
        if piece == unk:
            sp.type, sp.score = P.UNKNOWN, 0.0
        elif piece in special:
            sp.type, sp.score = P.CONTROL, 0.0
        elif BYTE_PIECE.match(piece):
            sp.type, sp.score = P.BYTE, 0.0
        else:
            sp.type = P.NORMAL
            sp.score = -float(rank.get(piece, len(rank) + vocab[piece]))

    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(by_id)
    trainer.byte_fallback = True
    trainer.unk_id = vocab.get(unk, 0) if unk else 0
    trainer.bos_id = ids.get("<s>", -1)
    trainer.eos_id = ids.get("</s>", -1)
    trainer.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = prepend
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def write_tokenizer_model(model_dir: Path, out: Path | None = None) -> Path:
    """Write `tokenizer.model` for model_dir/tokenizer.json (next to it unless `out`)."""
    out = out or model_dir / "tokenizer.model"
    data = model_proto_from_tokenizer_json(model_dir / "tokenizer.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def compare_tokenization(model_dir: Path, texts: list[str]) -> list[int]:
    """Indices of texts that SentencePiece (tokenizer.model) and tokenizers (tokenizer.json)
    split differently; [] means identical on all of them. Special tokens are compared as plain
    text: SentencePiece does not know added tokens (llama.cpp gets those from the GGUF vocab,
    and validation checks that end to end)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf.encode_special_tokens = True
    return [i for i, text in enumerate(texts)
            if sp.encode(text) != hf.encode(text, add_special_tokens=False).ids]
