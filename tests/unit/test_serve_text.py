"""Text in and out for the server: incremental detokenization never shows a broken
character, stop strings are never streamed past, and the placeholder codec of the
simulated engine reads its own text back."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvflow.engine_adapters.text import OutputText, PlaceholderCodec, StopStrings, WindowDetokenizer
from kvflow.request import FinishReason, RequestOutput

MULTIBYTE = "日本語 🚀 Café naïve 🎉!"


def test_window_detokenizer_streams_whole_characters_of_a_bpe_tokenizer() -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from tests.text_model import build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer.encode(MULTIBYTE)
    # The byte-level tokens split characters: some prefixes decode to U+FFFD.
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(1, len(ids)))
    detok = WindowDetokenizer(lambda t: tokenizer.decode(list(t), skip_special_tokens=True))
    deltas = [detok.push([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == MULTIBYTE


def test_window_detokenizer_flushes_a_truncated_character_at_the_end() -> None:
    data = "é".encode()

    def decode(ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    detok = WindowDetokenizer(decode)
    assert detok.push([data[0]]) == ""  # half a character: held back
    assert detok.flush() == "\ufffd"  # the output ended there: shown as it is


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["hello wor", "ld"], ["world"], ["hello ", ""], True),
        (["ab", "c", "d"], ["cx"], ["ab", "", "cd"], False),
        (["xx", "STOP", "yy"], ["STOP"], ["xx", ""], True),
        (["a", "b"], [], ["a", "b"], False),
        (["one. two", ". three"], [".", "two"], ["one"], True),
    ],
)
def test_stop_strings_hold_back_possible_starts_and_cut_before_the_first(
    pieces: list[str], stops: list[str], emitted: list[str], stopped: bool
) -> None:
    matcher = StopStrings(stops)
    out: list[str] = []
    found = False
    for piece in pieces:
        text, found = matcher.feed(piece)
        out.append(text)
        if found:
            break
    assert out == emitted and found is stopped


def test_output_text_ends_with_stop_and_flushes_held_text_at_length() -> None:
    codec = PlaceholderCodec()

    def output(ids: tuple[int, ...], finished: bool) -> RequestOutput:
        reason = FinishReason.LENGTH if finished else None
        return RequestOutput("r", ids, 0, finished, reason)

    text = OutputText(codec, ["tok9 tok1"])
    assert text.feed(output((7,), False)) == ("tok7 ", None)
    assert text.feed(output((9,), False)) == ("", None)  # "tok9 " may start the stop
    assert text.feed(output((8,), True)) == ("tok9 tok8 ", "length")
    stopped = OutputText(codec, ["tok9 tok1"])
    assert stopped.feed(output((9, 15), False)) == ("", "stop")


def test_a_stop_string_ends_the_output_at_the_token_that_completes_it() -> None:
    """An output holding several tokens (a server coalesces the steps a slow reader
    missed) is cut at the token whose text completes the stop string: the tokens after
    it are not counted (usage) nor listed (logprobs), as when the steps came one by one."""
    codec = PlaceholderCodec()
    text = OutputText(codec, ["tok9 tok1"])
    assert text.feed(RequestOutput("r", (7,), 1, False)) == ("tok7 ", None)
    assert text.num_kept == 1
    assert text.feed(RequestOutput("r", (9, 15, 4, 5), 5, False)) == ("", "stop")
    assert text.num_kept == 2  # tok9 and tok15 ("tok9 tok1" ends in tok15's text)
    one_by_one = OutputText(codec, ["tok9 tok1"])
    kept = 0
    for i, token in enumerate((7, 9, 15, 4, 5)):
        _, reason = one_by_one.feed(RequestOutput("r", (token,), i + 1, False))
        kept += one_by_one.num_kept
        if reason is not None:
            break
    assert kept == 3 == 1 + text.num_kept
    plain = OutputText(codec, [])
    assert plain.feed(RequestOutput("r", (1, 2), 2, True, FinishReason.LENGTH)) == (
        "tok1 tok2 ",
        "length",
    )
    assert plain.num_kept == 2


def test_placeholder_codec_reads_its_own_text_back() -> None:
    codec = PlaceholderCodec()
    ids = codec.encode("some words here")
    assert len(ids) == 3 and ids == codec.encode("some  words\nhere")
    assert codec.encode(codec.decode([300, 301])) == [300, 301]
    chat = codec.encode_chat([{"role": "user", "content": "hi there"}], True)
    assert len(chat) == 4  # "user:", "hi", "there", "assistant:"
