"""GPT-2: the network, with Hugging Face's parameter names and a preallocated KV cache."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig

if TYPE_CHECKING:
    from pathlib import Path


ATTENTION_BLOCK = 64  # positions: a batched decoding step attends over whole blocks of each row's cache slot


class KVCache:
    """Keys and values of every layer for up to block_size positions of batch_size sequences (slots),
    allocated once. It holds no position: each call says where its tokens go (start), as litgpt passes its
    input_pos, and which slot each row uses. It starts at zero, so a position that GPT.decode_step
    masks out is a finite number times a weight of exactly 0."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype) -> None:
        head_size = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, head_size)
        # one tensor per layer, so a step indexes a Python list instead of running tensor ops
        self.keys = [_zeros(shape, device, dtype) for _ in range(config.n_layer)]
        self.values = [_zeros(shape, device, dtype) for _ in range(config.n_layer)]


def _zeros(shape: tuple[int, ...], device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape), on the CPU in fresh anonymous memory, which the OS hands out zeroed a page at a time
    as it is first written: torch.zeros writes it all at once (0.5 s for the app's 16 rows of GPT-2, 1.2 GB, on
    a 2-core CPU; 30 ms for generate()'s one row), and a cache is mostly positions not yet reached."""
    count = math.prod(shape)
    if torch.device(device).type != "cpu" or count == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype, count=count).view(shape)


# A decoding step's attention kernel: (q (B, heads, head size), one layer's keys and values (slots, heads, context,
# head size) with the new positions written, slots (B,), positions (B,), scale) -> (B, heads, head size), each row
# over positions 0 .. its own of its slot and nothing else (serve's C++ library has one)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class DecodeRows(NamedTuple):
    """The rows of a batched decoding step (GPT.decode_step, one new token each): their cache slots and
    positions (B,), and how many positions of the cache every row reads: whole ATTENTION_BLOCKs up to the
    furthest row, at most the context."""

    slots: torch.Tensor
    positions: torch.Tensor
    length: int

    @classmethod
    def of(cls, slots: list[int], positions: list[int], block_size: int, device) -> DecodeRows:
        length = min(block_size, (max(positions) // ATTENTION_BLOCK + 1) * ATTENTION_BLOCK)
        return cls(torch.tensor(slots, device=device), torch.tensor(positions, device=device), length)


class CacheRows(NamedTuple):
    """Where each row of a cached call lives: (its cache slot, the position of its first new token); for
    one new token in each of several rows, the (slots, positions) index that writes them all at once."""

    pairs: list[tuple[int, int]]
    new_at: tuple[torch.Tensor, slice, torch.Tensor] | None

    @classmethod
    def of(cls, slots: list[int], starts: list[int], T: int, device) -> CacheRows:
        pairs = list(zip(slots, starts, strict=True))
        if T != 1 or len(slots) == 1:  # a slice copy is cheaper for one row
            return cls(pairs, None)
        return cls(pairs, (torch.tensor(slots, device=device), slice(None), torch.tensor(starts, device=device)))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rows: CacheRows | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:  # row by row, each in its own cache slot at its own position: a row's result never depends on others
            keys, values, pairs = cache.keys[layer], cache.values[layer], rows.pairs
            if rows.new_at is not None:  # one new position per row: all written in one indexed copy
                keys[rows.new_at] = k[:, :, 0]
                values[rows.new_at] = v[:, :, 0]
            else:
                for b, (slot, start) in enumerate(pairs):
                    keys[slot, :, start : start + T] = k[b]
                    values[slot, :, start : start + T] = v[b]
            y = [self._attend(q[b : b + 1], keys, values, slot, start) for b, (slot, start) in enumerate(pairs)]
            y = torch.cat(y) if B > 1 else y[0]
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self.c_proj(y)
        return F.dropout(y, self.dropout) if self.training else y

    @staticmethod
    def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Attention of one row's T queries at positions start .. start + T - 1 over its cache slot."""
        T = q.shape[2]
        mask, is_causal = None, T > 1
        if start and T > 1:  # a chunk after cached positions: each query sees its own prefix
            mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
            is_causal = False
        seen = slice(slot, slot + 1), slice(None), slice(0, start + T)
        return F.scaled_dot_product_attention(q, keys[seen], values[seen], attn_mask=mask, is_causal=is_causal)

    def decode(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: DecodeRows,
        masked: torch.Tensor | None,
        attend: Attend | None = None,
    ) -> torch.Tensor:
        """Attention of one new position per row (x: (B, C)) over its cache slot, every row in one batched
        computation. Each row reads the same rows.length positions, those past its own masked out, so its
        products and sums run over the same blocks whatever its batch-mates' lengths: masked scores are
        -inf, their weights exactly 0, and the values they meet finite (the cache starts at zero). Given
        attend (a kernel that reads each row's own positions only, see Attend), that does the attention."""
        B, C = x.shape
        q, k, v = self.c_attn(x).view(B, 3, self.n_head, C // self.n_head).unbind(1)  # (B, heads, head size)
        keys[rows.slots, :, rows.positions] = k
        values[rows.slots, :, rows.positions] = v
        if attend is not None:
            y = attend(q, keys, values, rows.slots, rows.positions, (C // self.n_head) ** -0.5)
            return self.c_proj(y.reshape(B, C))
        keys, values = keys[rows.slots, :, : rows.length], values[rows.slots, :, : rows.length]
        scores = (q[:, :, None] * keys).sum(-1) * (C // self.n_head) ** -0.5
        weights = scores.masked_fill(masked[:, None], float("-inf")).softmax(-1)  # (B, heads, length)
        y = (weights[..., None] * values).sum(-2)  # a sum, not a matmul: no split that depends on the length
        return self.c_proj(y.reshape(B, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout) if self.training else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rows: CacheRows | None = None):
        x = x + self.attn(self.ln_1(x), cache, layer, rows)
        return x + self.mlp(self.ln_2(x))

    def decode(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: DecodeRows, masked, attend=None
    ) -> torch.Tensor:
        """forward for one new position per row (x: (B, C)), its attention batched over the rows' cache slots."""
        x = x + self.attn.decode(self.ln_1(x), keys, values, rows, masked, attend)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GPTConfig()
        # built under torch.device("meta") (shapes only, weights loaded next) nothing is initialised: normal_ on
        # a meta tensor imports torch._dynamo, seconds of the app's start-up. `_weight` skips nn.Embedding's own
        # normal_; elsewhere the model is built and initialised as it always was, the same weights for a seed
        shapes_only = torch.get_default_device().type == "meta"

        def embedding(rows: int) -> nn.Embedding:
            return nn.Embedding(rows, config.n_embd, _weight=torch.empty(rows, config.n_embd) if shapes_only else None)

        self.transformer = nn.ModuleDict(
            dict(
                wte=embedding(config.vocab_size),
                wpe=embedding(config.block_size),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if not shapes_only:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)
            elif name.endswith(("wte.weight", "wpe.weight")) or (name.endswith(".weight") and param.dim() == 2):
                nn.init.normal_(param, mean=0.0, std=0.02)
            elif "ln_" in name and name.endswith(".weight"):
                nn.init.ones_(param)
            else:
                nn.init.zeros_(param)

    def num_parameters(self) -> int:
        """Parameter count of this config, the tied embedding / output head counted once (counted on
        a fresh meta-device copy, so a model whose layers were swapped for int8 ones counts the same)."""
        with torch.device("meta"):
            return sum(p.numel() for p in GPT(self.config).parameters())

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def rows_of(self, B: int, T: int, start, slots) -> tuple[list[int], list[int]]:
        """Each row's first position and cache slot, checked, for a cached call of B rows of T tokens: start
        is one number for every row or a list with each row's own; slots default to 0 .. B - 1."""
        starts = [start] * B if isinstance(start, int) else [int(s) for s in start]
        slots = list(range(B)) if slots is None else [int(s) for s in slots]
        if len(starts) != B or len(slots) != B or min(starts) < 0:
            raise ValueError(f"{B} rows need {B} start positions (>= 0) and cache slots")
        if max(starts) + T > self.config.block_size:
            raise ValueError(
                f"sequence of {max(starts) + T} tokens is longer than the context ({self.config.block_size}); "
                "crop it to the last block_size tokens"
            )
        return starts, slots

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None, start=0, slots=None) -> torch.Tensor:
        """The final hidden states of idx (B, T). Row b is at positions start .. start + T - 1 (start: one
        number for every row, or a list with each row's own); with a cache, row b's keys and values are
        written into cache slot slots[b] (default b) and its earlier positions are read from there."""
        B, T = idx.shape
        starts, slots = self.rows_of(B, T, start, slots)
        if isinstance(start, int):
            positions = self.transformer.wpe.weight[start : start + T]  # a slice: no index tensor
        else:
            offsets = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)
            positions = self.transformer.wpe(offsets)
        x = self.transformer.wte(idx) + positions
        if self.training:
            x = self.transformer.drop(x)
        rows = CacheRows.of(slots, starts, T, idx.device) if cache is not None else None
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, rows)
        return self.transformer.ln_f(x)

    def decode_step(
        self,
        idx: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        rows: DecodeRows,
        attend: Attend | None = None,
    ):
        """The next logits (B, vocab) of B rows after one new token each (idx: (B,)), each at its own
        position and cache slot (rows), every layer's attention batched over the rows (CausalSelfAttention.decode,
        or attend where given). Only tensors and one length come in, so serve.CompiledDecoding compiles it once
        for any batch."""
        x = self.transformer.wte(idx) + self.transformer.wpe(rows.positions)
        masked = None if attend is not None else torch.arange(rows.length, device=idx.device) > rows.positions[:, None]
        for block, layer_keys, layer_values in zip(self.transformer.h, keys, values, strict=True):
            x = block.decode(x, layer_keys, layer_values, rows, masked, attend)
        return self.lm_head(self.transformer.ln_f(x))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of idx (B, T) and, with targets, the mean cross-entropy (against targets
        mixed with label_smoothing of the uniform distribution, when that is above 0: for training only)."""
        logits = self.lm_head(self._hidden(idx))
        loss = None
        if targets is not None:
            flat = logits.flatten(0, 1).float()
            loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss

    def new_kv_cache(self, batch_size: int = 1) -> KVCache:
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    def next_token_logits(self, idx: torch.Tensor, cache: KVCache, start=None, slots=None, **old) -> torch.Tensor:
        """Run idx (B, T) at positions start .. start + T - 1 after the start positions already in the cache,
        and return each row's last logits (B, vocab). start is one number for every row or a list with each
        row's own; row b uses cache slot slots[b] (default b). Rows are independent: each attends over its own
        slot only, so decoding many sequences is one call with one row each."""
        return self.lm_head(self._hidden(idx, cache, _start(start, old), slots)[:, -1])

    def fill_cache(self, idx: torch.Tensor, cache: KVCache, start=None, slots=None, **old) -> None:
        """next_token_logits without the logits: only the cache is written (a prompt's chunks before its last
        need no output head, which reads the whole token embedding: 38.6M of GPT-2's 124M weights)."""
        self._hidden(idx, cache, _start(start, old), slots)

    # Checkpoint I/O lives in loading.py, saving.py and hub.py; these methods only hand over to them.

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device=None, dtype=None) -> GPT:
        """Load a local folder, a Hub repo id (`org/name` or `org/name@revision`), or a single
        `.safetensors` / `.pt` file (Hugging Face GPT-2 layout or a nanoGPT-style state dict)."""
        from .loading import load_checkpoint, load_weights

        config, state_dict = load_checkpoint(source)
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, state_dict)
        model.eval()
        return model.to(device=device, dtype=dtype or torch.float32)

    def save_pretrained(self, folder: str | Path, model_card: str | None = None) -> Path:
        """Write the Hugging Face GPT-2 layout (config.json, model.safetensors, tokenizer files, README.md)."""
        from .saving import save_folder

        return save_folder(self, folder, model_card)

    def push_to_hub(
        self, repo_id: str, private: bool = False, token: str | None = None, model_card: str | None = None
    ) -> str:
        """Upload the saved folder and a model card to the Hub; returns the commit URL."""
        from .saving import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, model_card=model_card)


def _start(start, old: dict):
    """start, or the value under its old keyword name input_pos (with a one-line deprecation warning)."""
    if set(old) - {"input_pos"} or (start is None) == ("input_pos" not in old):
        raise TypeError("give start (the first new token's position) once, by position or as start=")
    if "input_pos" in old:
        warnings.warn("input_pos= is deprecated: call it start=", DeprecationWarning, stacklevel=3)
        return old["input_pos"]
    return start
