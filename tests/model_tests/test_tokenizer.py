"""model/tokenizer.py: the gpt2 encoding, special-token text, and streaming whole UTF-8 characters."""

import os
import random
import shutil

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


# Offline, from the files that travel with the project and with every model folder

# GPT-2 encodings: published examples (Hugging Face's GPT-2 docs) and ids checked once against tiktoken.
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " the": [262],
    "Hello, my dog is cute": [15496, 11, 616, 3290, 318, 13779],
    "ROMEO:": [33676, 4720, 25],  # as tiktoken.get_encoding("gpt2") gives
    "": [],
    "\n\n": [628],
}


@pytest.mark.parametrize("text", KNOWN_IDS)
def test_known_gpt2_ids(tokenizer, text):
    assert tokenizer.encode(text) == KNOWN_IDS[text]
    assert tokenizer.decode(KNOWN_IDS[text]) == text


def test_special_token_text_only_when_allowed(tokenizer):
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    assert tokenizer.encode("a<|endoftext|>", allowed_special={"<|endoftext|>"}) == [64, EOT_TOKEN]


def test_the_tokenizer_is_built_without_network_or_caches(monkeypatch, tmp_path):
    """No download, no tiktoken cache setting, no home folder: the packaged vocab.json + merges.txt suffice."""
    import socket

    from model import tokenizer as tokenizer_module

    def no_network(*args, **kwargs):
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in [name for name in os.environ if name.startswith("TIKTOKEN")]:  # no tiktoken cache setting
        monkeypatch.delenv(name)
    tokenizer_module._load.cache_clear()
    fresh = load_tokenizer()
    assert fresh.encode("Hello world") == [15496, 995] and fresh.n_vocab == 50257
    assert not any(tmp_path.iterdir())


def test_a_model_folder_uses_its_own_tokenizer_files(tiny_model, tmp_path, tokenizer):
    from model.tokenizer import TokenizerError

    folder = tiny_model.save_pretrained(tmp_path / "m")
    own = load_tokenizer(folder)
    assert own is not load_tokenizer() and own.encode("Hello world") == [15496, 995]
    assert load_tokenizer(folder / "model.safetensors") is own  # a weights file means its folder
    assert load_tokenizer(tmp_path / "no-files") is load_tokenizer()  # no files there: the packaged ones

    merges = (folder / "merges.txt").read_text().split("\n")
    merges[5], merges[6] = merges[6], merges[5]  # two merges in the wrong order: not GPT-2's BPE
    (tmp_path / "bad").mkdir()
    shutil.copy(folder / "vocab.json", tmp_path / "bad")
    (tmp_path / "bad" / "merges.txt").write_text("\n".join(merges))
    with pytest.raises(TokenizerError, match="not a GPT-2 byte-level BPE"):
        load_tokenizer(tmp_path / "bad")


@pytest.mark.parametrize("only", ["vocab.json", "merges.txt"])
def test_a_folder_with_only_one_of_the_two_files_uses_the_packaged_tokenizer(tiny_model, tmp_path, only):
    """vocab.json without merges.txt (or the other way round) is not a tokenizer: the packaged one is used."""
    folder = tiny_model.save_pretrained(tmp_path / "m")
    (folder / ("merges.txt" if only == "vocab.json" else "vocab.json")).unlink()
    assert load_tokenizer(folder) is load_tokenizer()


def test_auto_tokenizer_on_a_saved_folder_gives_the_same_ids(tiny_model, tmp_path, tokenizer):
    from transformers import AutoTokenizer

    folder = tiny_model.save_pretrained(tmp_path / "m")
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.model_max_length == tiny_model.config.block_size
    assert hf.eos_token_id == hf.bos_token_id == EOT_TOKEN
    rng = random.Random(0)
    texts = [*TEXTS, *KNOWN_IDS, " leading and trailing  ", "tabs\tand\r\nCRLF", "'s 've 're 'll don't"]
    texts += ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 30))) for _ in range(200)]
    for text in texts:
        assert hf(text)["input_ids"] == tokenizer.encode(text), text
        assert hf.decode(tokenizer.encode(text)) == text
    # transformers reads special-token text as the special token; here that needs allowed_special
    assert hf("a <|endoftext|>")["input_ids"] == tokenizer.encode("a <|endoftext|>", allowed_special="all")
