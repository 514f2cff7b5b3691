"""The model's own tokenizer: tokenizer.json through the `tokenizers` library, the ids that
transformers (the reference, and training) produces, BOS and special tokens included.

Copied into every bundle beside core.py; imported only by the runtime modules that use it: those
whose runtime tokenizes differently (ORT GenAI's own tokenizer splits a run of spaces before a
digit otherwise and leaves out the post-processor's BOS; docs/upstream/) or not at all (ONNX
Runtime with QNN). Needs `tokenizers` only, which those targets' locks carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer


class HfTokenizer:
    def __init__(self, model_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
