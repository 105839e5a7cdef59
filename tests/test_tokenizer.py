"""model/tokenizer.py: the gpt2 encoding, special-token text, and streaming whole UTF-8 characters."""

import random

import pytest

from model import EOT_TOKEN, load_tokenizer, stream_text

TEXTS = [
    "ő",
    "Fő utca 🎭 naïve — 日本語 🙂🙃",
    "👨\u200d👩\u200d👧 family",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_it_is_gpt2s_encoding(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot_token == EOT_TOKEN == 50256
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([EOT_TOKEN]) == "<|endoftext|>"
    assert load_tokenizer() is tokenizer  # built once


def test_end_of_text_in_a_prompt_is_ordinary_text(tokenizer):
    text = "a <|endoftext|> b"
    ids = tokenizer.encode(text)
    assert EOT_TOKEN not in ids
    assert tokenizer.decode(ids) == text
    assert EOT_TOKEN not in tokenizer.encode("<|endoftext|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("text", TEXTS)
def test_stream_text_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    if not text.isascii():  # the case under test: tokens that each hold part of a character
        assert any(is_partial_utf8(tokenizer.decode_single_token_bytes(t)) for t in ids)
    chunks = list(stream_text(ids, tokenizer))
    for chunk in chunks:
        assert chunk and "\ufffd" not in chunk
        chunk.encode("utf-8")  # no lone surrogates either
    assert "".join(chunks) == text


def test_stream_text_joins_to_the_decoded_text_for_any_tokens(tokenizer):
    """Random tokens make invalid byte sequences too: the stream still equals decode()."""
    rng = random.Random(0)
    ids = [rng.randrange(EOT_TOKEN) for _ in range(300)]
    assert "".join(stream_text(ids)) == tokenizer.decode(ids)


def test_end_of_text_ends_the_stream(tokenizer):
    def tokens():
        yield from tokenizer.encode("Fő")
        yield EOT_TOKEN
        raise AssertionError("stream_text read past the end-of-text token")

    assert "".join(stream_text(tokens(), tokenizer)) == "Fő"
    assert list(stream_text([EOT_TOKEN, *tokenizer.encode("hidden")])) == []


def test_stream_text_streams(tokenizer):
    """Each chunk comes out as soon as its character is complete, not after the whole input."""
    read = []

    def tokens():
        for token in tokenizer.encode("ab ő cd"):
            read.append(token)
            yield token

    stream = stream_text(tokens(), tokenizer)
    assert next(stream) == "ab"
    assert len(read) == 1
    assert next(stream) == " "  # the space is whole; the 2-byte 'ő' that follows it is not yet
    assert next(stream) == "ő"
    assert len(read) == 3
