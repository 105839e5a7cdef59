"""The layers serving runs its Linear layers through on the CPU: int8 weights (Int8Linear, with the op a compiled
graph calls it by) and oneDNN-packed bf16 weights (PackedBF16Linear), and the replacement of a model's Linear
layers by either. Which one a model gets is serve/inference.py's choice.

Decoding reads every weight once per token, so on a CPU its speed is set by memory bandwidth: bf16 weights
halve the bytes of fp32 and int8 weights quarter them. Int8Linear has int8 weights with one scale per output
row and quantises each activation row on the fly: through torch operations around fbgemm's int8 Linear until
serve/native.py's library is loaded, then in one call of it (its own kernel for a decoding step's few rows,
fbgemm's for more), with the same bits. Its weights are kept twice, in fbgemm's packing and in the library's
tiles (125 MB more for GPT-2 124M), and the library keeps every layer it was given for the process's life.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from model import GPT
from model.device import capabilities, probed

from . import native

_FBGEMM_INT8_LINEAR = (
    torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default if probed().int8 else None
)
# torch.compile cannot trace fbgemm's packed weights (a TorchScript object), so a compiled graph calls the
# int8 Linear through this op, which takes the layer's number in _LAYERS instead (serve.compiled registers them)
_LAYERS: list = []
_LIBRARY = torch.library.Library("shakespeare", "DEF")
_LIBRARY.define("int8_linear(Tensor x, int layer, int out_features) -> Tensor")


def _int8_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return _LAYERS[layer].int8_matmul(x)


_LIBRARY.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("shakespeare::int8_linear")
def _int8_linear_shape(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """A Linear layer for inference with int8 weights (one scale per output row) and fp32 activations.

    Each input row is scaled to max |x| = 1 and quantised with one fixed range, so a row's output never
    depends on the other rows of the batch: integer products are exact and every step after them is per
    row. (PyTorch's dynamic int8 Linear takes one range from the whole input, which moves a row's
    result by up to ~0.05 with its batch-mates: a seeded answer would change with who else is served.)
    """

    # [-1, 1] on 127 levels (0 .. 126): 7 bits, so AVX2 machines without VNNI cannot saturate int16 sums
    INPUT_SCALE, INPUT_ZERO_POINT = 1 / 63, 63

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        weight = weight.detach().float()
        # what a forward pass reads: the int8 values, an fp32 scale per row, the fp32 bias
        self.weight_bytes = weight.numel() + 4 * self.out_features + (0 if bias is None else 4 * bias.numel())
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros(len(scales), dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().clone()  # its own copy, not the fp32 layer's
        with warnings.catch_warnings():  # PyTorch marks quantised tensors for a later move to torchao
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # the same weights for this project's own kernel (serve/native.py), which decoding steps use once it is
        # built: the same bits as fbgemm's, faster for a few rows
        self._own = native.PackedInt8(qweight.int_repr(), qweight.q_per_channel_scales(), self.bias, self.INPUT_SCALE)
        self._native: int | None = None  # its number in the library, once registered there
        self.native_in_graph = False  # whether a compiled graph calls the library (set once, before tracing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self.native_in_graph:  # fixed before tracing (serve.compiled), so no guard on it ever fails
                return torch.ops.shakespeare_native.linear(x, self._native, self.out_features)
        elif native.ready():  # one call: this project's kernel for a decoding step's few rows, fbgemm's for more
            return torch.ops.shakespeare_native.linear(x, self.native_number(), self.out_features)
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)  # 4x faster than vector_norm(inf) on 8 rows
        if torch.compiler.is_compiling():
            y = torch.ops.shakespeare.int8_linear(x / scale, self.traceable(), self.out_features)
        else:
            y = self.int8_matmul(x / scale)
        return y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)

    def int8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 product of rows already scaled to max |x| = 1 (without the bias): the library's once it is
        loaded, fbgemm's kernel alone before."""
        if native.ready():
            return torch.ops.shakespeare_native.linear(x, self.native_number(), self.out_features, with_bias=False)
        return _FBGEMM_INT8_LINEAR(x, self.INPUT_SCALE, self.INPUT_ZERO_POINT, self._packed)

    def native_number(self) -> int:
        """This layer's number in serve/native.py's library (registered on first use, once it is loaded)."""
        if self._native is None:
            self._native = self._own.register(self._packed)
        return self._native

    def through(self, x: torch.Tensor, path: int) -> torch.Tensor:
        """forward on one path of the library: 0 fbgemm's kernel, else native.SIMD's numbers (tests, benches)."""
        return torch.ops.shakespeare_native.linear(x, self.native_number(), self.out_features, path)

    def traceable(self) -> int:
        """This layer's number for torch.ops.shakespeare.int8_linear (registered on first use)."""
        if getattr(self, "_layer", None) is None:
            _LAYERS.append(self)
            self._layer = len(_LAYERS) - 1
        return self._layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class PackedBF16Linear(nn.Module):
    """A bf16 Linear layer for the CPU with its weight prepacked by oneDNN for one-row inputs: decoding
    runs about 1.7x faster than through F.linear's bf16 path, with the same results."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.weight_bytes = weight.nbytes + (0 if bias is None else self.bias.nbytes)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 oneDNN-packed"


def replace_linears(model: GPT, make) -> GPT:
    """Replace every Linear of the blocks and the output head with make(weight, bias), in place. The
    token embedding stays as it is (a lookup reads one row); the head gets its own copy."""
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make(child.weight, child.bias))
    model.lm_head = make(model.lm_head.weight, None)
    return model


def quantize_int8(model: GPT) -> GPT:
    """Int8 weights for every Linear of the blocks and the output head (Int8Linear), in place."""
    if not capabilities().int8:
        raise ValueError("this PyTorch build has no fbgemm int8 kernels; use --quantize none")
    native.start()  # the faster kernel for decoding steps, built or loaded meanwhile
    return replace_linears(model, Int8Linear)
