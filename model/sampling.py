"""Autoregressive sampling with a KV cache: the one place every caller generates text from."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence

import torch

from .gpt import GPT
from .tokenizer import EOT_TOKEN


def _check(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top_k most likely and to
    the smallest set whose probability reaches top_p (the most likely token always stays).
    Temperature 0 or top_k 1 is greedy. Only the candidates are sorted and sampled, not the vocabulary."""
    if temperature == 0 or top_k == 1:
        return int(logits.argmax())
    logits, candidates = logits / temperature, None
    if top_k and top_k < logits.numel():
        logits, candidates = torch.topk(logits, top_k)  # sorted, most likely first
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, descending=True)
        probs = logits.softmax(-1)
        keep = int((probs.cumsum(-1) - probs < top_p).sum())  # mass before a token not yet enough
        logits, candidates = logits[:keep], candidates[:keep]
    choice = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    return choice if candidates is None else int(candidates[choice])


@torch.inference_mode()
def _logits(model: GPT, tokens: torch.Tensor, cache) -> torch.Tensor:
    return model.next_token_logits(tokens, cache)[0].float()


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time. Temperature 0 is greedy; a seed
    makes the output reproducible whatever else runs; stops after <|endoftext|>. The model runs in
    eval mode while the generator is live. The prompt is
    prefilled once into a KV cache, then one position runs per step; once the sequence outgrows
    the context, each step runs on the last block_size tokens."""
    _check(max_new_tokens, temperature, top_k, top_p)
    tokens = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not tokens:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the end-of-text token 50256)")
    vocab_size = model.config.vocab_size
    if any(not 0 <= t < vocab_size for t in tokens):
        raise ValueError(f"prompt_ids must be token ids in [0, {vocab_size})")
    block_size = model.config.block_size
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    cache = model.new_kv_cache()

    def prefill(window: list[int]) -> torch.Tensor:
        cache.length = 0
        return _logits(model, torch.tensor([window], device=device), cache)

    was_training = model.training
    model.eval()  # no dropout while sampling (and no draw from the global RNG a trainer relies on)
    try:
        logits = prefill(tokens[-block_size:])
        for step in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, top_p, generator)
            yield token
            if token == EOT_TOKEN or step == max_new_tokens - 1:
                return
            tokens.append(token)
            if cache.length < block_size:
                logits = _logits(model, torch.tensor([[token]], device=device), cache)
            else:  # positions are absolute, so a shifted window must be recomputed
                logits = prefill(tokens[-block_size:])
    finally:
        model.train(was_training)
