"""The tiktoken `gpt2` tokenizer, and text streaming that never splits a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from functools import lru_cache

import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>


class TextEncoding(tiktoken.Encoding):
    """tiktoken's `gpt2` encoding whose encode() treats special-token text as ordinary text,
    so a prompt that contains "<|endoftext|>" is never refused nor turned into the EOT token."""

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special=()) -> list[int]:
        return super().encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)


@lru_cache(maxsize=1)
def load_tokenizer() -> TextEncoding:
    base = tiktoken.get_encoding("gpt2")
    return TextEncoding(
        name=base.name,
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens=base._special_tokens,
    )


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
