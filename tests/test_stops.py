"""Stop strings and whole characters: what a stream may send, whatever the pieces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllm_p2p.engine import load_model
from dllm_p2p.engine.detok import IncrementalDecoder
from dllm_p2p.engine.stops import StopText


def cut(text: str, stops: list[str]) -> str:
    """The text before the stop string that a token-by-token reader sees complete first."""
    for end in range(len(text) + 1):
        done = [text[: end - len(s)] for s in stops if text[:end].endswith(s)]
        if done:
            return min(done, key=len)
    return text


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@given(
    text=st.text(alphabet="ab\nUser:", max_size=40),
    stops=st.lists(st.text(alphabet="ab\nUser:", min_size=1, max_size=6), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=12),
)
@settings(max_examples=400, deadline=None)
def test_streamed_text_is_the_text_before_the_first_stop_however_it_is_split(text: str, stops: list[str], cuts: list[int]) -> None:
    matcher = StopText(stops)
    sent = [matcher.push(piece) for piece in split(text, cuts)]
    sent.append(matcher.flush())
    assert "".join(sent) == cut(text, stops)
    assert (matcher.matched is not None) == any(s in text for s in stops)
    # Nothing sent ever contains a stop string, even across pieces.
    assert not any(s in "".join(sent) for s in stops)


def test_a_split_stop_string_is_held_back_until_it_is_decided() -> None:
    matcher = StopText(["\nUser:"])
    assert matcher.push("Hello\nUs") == "Hello"  # "\nUs" might begin the stop string
    assert matcher.push("eful") == "\nUseful"  # it did not
    assert matcher.push(" yes\nUse") == " yes"
    assert matcher.push("r: more") == "" and matcher.matched == "\nUser:"
    assert matcher.flush() == ""


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_model("tiny").tokenizer  # byte-level BPE: multi-byte characters span tokens


@given(text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\ufffd"), max_size=60))
@settings(max_examples=300, deadline=None)
def test_streaming_never_sends_part_of_a_character(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer(text)["input_ids"]
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_character_cut_off_at_the_end_is_dropped_not_sent_as_a_replacement(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("ok 🙂")["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    whole = "".join(decoder.push(token) for token in ids) + decoder.flush()
    for end in range(1, len(ids)):
        decoder = IncrementalDecoder(tokenizer)
        text = "".join(decoder.push(token) for token in ids[:end]) + decoder.flush()
        assert "\ufffd" not in text and whole.startswith(text)
