"""The runner's incremental detokenizer: what it streams is exactly the full decode."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from conftest import TINY
from toolkit.runner.core import TextStream

TOKENIZER = Tokenizer.from_file(str(TINY / "tokenizer.json"))


class HfSession:
    """Just the part of a Session TextStream uses, decoding like transformers."""

    calls = 0

    def detokenize(self, ids):
        HfSession.calls += 1
        return TOKENIZER.decode(list(ids), skip_special_tokens=False)


# valid text of any script (emoji and CJK go through byte-fallback pieces), interleaved with
# arbitrary normal pieces and newlines / special tokens
pieces = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
            max_size=12).map(
        lambda t: TOKENIZER.encode(t, add_special_tokens=False).ids),
    st.lists(st.integers(259, 31999), max_size=4),
    st.sampled_from([[29871], [13], [32007], [1]]))


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=12))
def test_streamed_pieces_concatenate_to_the_full_decode(chunks):
    tokens = [t for chunk in chunks for t in chunk]
    stream = TextStream(HfSession())
    streamed = "".join(stream.push(t) for t in tokens)
    assert streamed == TOKENIZER.decode(tokens, skip_special_tokens=False)


def test_utf8_split_across_byte_tokens_and_cost_is_linear():
    text = "Grüße, 世界 🙂 " * 40
    tokens = TOKENIZER.encode(text, add_special_tokens=False).ids
    HfSession.calls = 0
    stream = TextStream(HfSession())
    assert "".join(stream.push(t) for t in tokens) == TOKENIZER.decode(tokens)
    assert HfSession.calls == 2 * len(tokens)  # two short decodes per token, not a growing one
