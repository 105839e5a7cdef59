"""The GPT-2 tokenizer, built offline from the Hugging Face `vocab.json` + `merges.txt` (the same data as
tiktoken's `gpt2` encoding), the names of its files in a model folder, and text streaming that never splits
a UTF-8 character."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"
# The tokenizer files that travel with the project and with every model folder.
PACKAGED = Path(__file__).resolve().parent / "gpt2_tokenizer"
VOCAB_NAME, MERGES_NAME, TOKENIZER_JSON_NAME = "vocab.json", "merges.txt", "tokenizer.json"
TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_NAME = "tokenizer_config.json", "special_tokens_map.json"
TOKENIZER_FILES = (VOCAB_NAME, MERGES_NAME, TOKENIZER_JSON_NAME, TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_NAME)
# tiktoken's gpt2 split pattern (tiktoken_ext/openai_public.py)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(RuntimeError):
    """Tokenizer files that are missing or do not form a GPT-2 byte-level BPE."""


class TextEncoding(tiktoken.Encoding):
    """The `gpt2` encoding whose encode() treats special-token text as ordinary text,
    so a prompt that contains "<|endoftext|>" is never refused nor turned into the EOT token."""

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special=()) -> list[int]:
        return super().encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)


def _to_bytes() -> dict[int, str]:
    """GPT-2's byte-level alphabet as a str.translate table: vocab.json writes each byte as a printable
    character, which becomes chr(byte) here, so the translated token encoded as latin-1 is its bytes. Any
    other character below 256 becomes U+FFFD, which latin-1 cannot encode: a token written outside the
    alphabet is refused (characters above it are left as they are, and cannot be encoded either)."""
    table, extra = {}, 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            table[b] = chr(b)
        else:
            table[b], table[256 + extra] = "\ufffd", chr(b)
            extra += 1
    return table


def _read_ranks(folder: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """tiktoken's mergeable ranks and special tokens from a folder's vocab.json and merges.txt,
    checked against each other (the rank of the i-th merge must be 256 + i, as GPT-2's BPE needs)."""
    try:
        vocab = json.loads((folder / VOCAB_NAME).read_text(encoding="utf-8"))
        merges = (folder / MERGES_NAME).read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot read the tokenizer files in {folder}: {err}") from err
    to_byte = _to_bytes()  # str.translate runs in C, where a generator per token ran in Python
    special = {text: vocab.pop(text) for text in (EOT_TEXT,) if text in vocab}
    try:
        ranks = {token.translate(to_byte).encode("latin-1"): rank for token, rank in vocab.items()}
        pairs = [line.split() for line in merges if line and not line.startswith("#version")]
        consistent = len(pairs) + 256 == len(ranks) and all(
            ranks.get((first + second).translate(to_byte).encode("latin-1")) == 256 + i
            for i, (first, second) in enumerate(pairs)
        )
    except (UnicodeEncodeError, ValueError, TypeError, AttributeError):
        consistent = False
    if not consistent or EOT_TEXT not in special:
        raise TokenizerError(
            f"{folder / VOCAB_NAME} and {folder / MERGES_NAME} are not a GPT-2 byte-level BPE vocabulary "
            f"with {EOT_TEXT}; copy them from the model it was trained with"
        )
    return ranks, special


@lru_cache(maxsize=8)
def _load(folder: Path) -> TextEncoding:
    ranks, special = _read_ranks(folder)
    return TextEncoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def load_tokenizer(folder: str | Path | None = None) -> TextEncoding:
    """The GPT-2 encoding from a model folder's own vocab.json + merges.txt when it has them, else from
    the files shipped in this package. Never touches the network; built once per folder."""
    if folder is not None:
        folder = Path(folder)
        if folder.is_file():
            folder = folder.parent
        if (folder / VOCAB_NAME).is_file() and (folder / MERGES_NAME).is_file():
            return _load(folder.resolve())
    return _load(PACKAGED)


def stream_text(token_ids: Iterable[int], tokenizer: tiktoken.Encoding | None = None) -> Iterator[str]:
    """Turn a stream of token ids into text chunks, holding bytes back until they form whole
    UTF-8 characters. The end-of-text token ends the text and is not shown."""
    tokenizer = tokenizer or load_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        if token == EOT_TOKEN:
            break
        chunk = decoder.decode(tokenizer.decode_single_token_bytes(token))
        if chunk:
            yield chunk
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
