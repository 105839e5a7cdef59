"""serve/kernels.py Int8Linear semantics: one symmetric int8 scale per output row (max |w| / 127),
checked by the error it leaves on rows of very different sizes and against an exact reference."""

import pytest
import torch
import torch.nn.functional as F

from serve.inference import int8_supported
from serve.kernels import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not int8_supported(), reason="this PyTorch build has no fbgemm int8 kernels")

OUT, IN = 16, 64
# The correct layer's worst row error here is 0.025 (weights 0.01, activations quantised to 7 bits 0.02):
# twice that catches a wrong scale; one scale for the whole tensor leaves the small rows near 100%.
ROW_ERROR_BOUND = 0.05


def uneven_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose row i is scaled by 10 ** (i % 4 - 2), and a small bias."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([10.0 ** (i % 4 - 2) for i in range(OUT)])
    weight = torch.randn(OUT, IN, generator=generator) * sizes[:, None]
    return weight, torch.randn(OUT, generator=generator) * 0.001


def row_errors(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Each output row's (column's) relative error over the batch."""
    return (got - expected).norm(dim=0) / expected.norm(dim=0)


def quantised(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight as symmetric int8 with these per-row scales would store it (round half to even)."""
    return (weight / scales[:, None]).round().clamp(-127, 127) * scales[:, None]


@pytest.mark.parametrize("seed", range(3))
def test_each_row_keeps_a_small_relative_error(seed):
    """Rows 10,000x apart in size each stay within ROW_ERROR_BOUND of fp32; one scale per tensor would not."""
    weight, bias = uneven_rows(seed)
    x = torch.randn(32, IN, generator=torch.Generator().manual_seed(100 + seed))
    expected = F.linear(x, weight, bias)
    errors = row_errors(Int8Linear(weight, bias)(x), expected)
    assert errors.max() < ROW_ERROR_BOUND, errors
    # the bound can fail: one scale for the whole tensor wipes out the small rows
    per_tensor = quantised(weight, weight.abs().max().expand(OUT) / 127)
    assert row_errors(F.linear(x, per_tensor, bias), expected).max() > 10 * ROW_ERROR_BOUND
    # and a per-row scale half the right size clips every row's largest weights
    clipped = quantised(weight, weight.abs().amax(dim=1) / 254)
    assert row_errors(F.linear(x, clipped, bias), expected).max() > ROW_ERROR_BOUND


@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_equals_per_row_quantised_weights_exactly(with_bias):
    """On activations int8 represents exactly (integers in [-63, 63], each row reaching 63 in size: a row
    is quantised on 63 steps of its own max |x| either side of 0), the output is x @ Wq.T + b with
    Wq = round(w / s) * s and s = max |w| of the row / 127: any other scale, rounding or clamp shows."""
    weight, bias = uneven_rows(7)
    bias = bias if with_bias else None
    x = torch.randint(-63, 64, (32, IN), generator=torch.Generator().manual_seed(8)).float()
    x[:, 0] = torch.where(torch.arange(32) % 2 == 0, 63.0, -63.0)
    expected = F.linear(x, quantised(weight, weight.abs().amax(dim=1) / 127), bias)
    got = Int8Linear(weight, bias)(x)
    assert row_errors(got, expected).max() < 1e-5
    # the weight error alone is what an int8 weight leaves, well above the float error allowed above
    assert row_errors(expected, F.linear(x, weight, bias)).min() > 1e-4
    coarser = F.linear(x, quantised(weight, weight.abs().amax(dim=1) / 126), bias)
    assert row_errors(got, coarser).max() > 1e-4  # a scale 1% off is seen


def test_a_zero_row_gives_its_bias():
    """An all-zero weight row (no scale to take) outputs exactly its bias, never NaN."""
    weight, bias = uneven_rows(1)
    weight[3] = 0
    out = Int8Linear(weight, bias)(torch.randn(5, IN))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 3], bias[3].expand(5))


def test_shape_bytes_and_description():
    """in/out features, the bytes a forward reads (int8 weights, fp32 row scales and bias) and the repr."""
    weight, bias = torch.randn(24, 40), torch.randn(24)
    layer = Int8Linear(weight, bias)
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert layer.weight_bytes == 24 * 40 + 4 * 24 + 4 * 24
    assert Int8Linear(weight, None).weight_bytes == 24 * 40 + 4 * 24
    assert layer(torch.randn(3, 40)).shape == (3, 24)
    assert layer(torch.randn(2, 5, 40)).shape == (2, 5, 24)
    assert repr(layer) == "Int8Linear(in_features=40, out_features=24, int8 per-row)"


def test_the_layer_copies_its_weights():
    """Changing the fp32 weight after quantising does not change the int8 layer (its bias is shared, not copied)."""
    weight, bias = uneven_rows(2)
    layer = Int8Linear(weight, bias)
    x = torch.randn(4, IN)
    before = layer(x)
    weight.mul_(3)
    assert torch.equal(layer(x), before)


def test_quantize_int8_keeps_every_row_of_a_model_close(tiny_model):
    """quantize_int8 on a model: each Linear's rows stay within the bound of the fp32 layer they replace."""
    block = tiny_model.transformer.h[0]
    linears = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in block.mlp.named_children()}
    linears = {n: wb for n, wb in linears.items() if wb[0].dim() == 2}
    quantize_int8(tiny_model)
    x = torch.randn(8, tiny_model.config.n_embd)
    for name, (weight, bias) in linears.items():
        layer = getattr(block.mlp, name)
        assert isinstance(layer, Int8Linear)
        inputs = x if weight.shape[1] == x.shape[1] else torch.randn(8, weight.shape[1])
        assert row_errors(layer(inputs), F.linear(inputs, weight, bias)).max() < ROW_ERROR_BOUND


def test_a_rows_output_does_not_depend_on_its_batch_mates():
    """The same input row gives bit-identical outputs alone and among 1, 3, 7 or 15 other rows of any size
    (the per-row input range); PyTorch's dynamic int8 Linear, one range for the whole batch, does not."""
    weight, bias = uneven_rows(3)
    layer = Int8Linear(weight, bias)
    generator = torch.Generator().manual_seed(9)
    row = torch.randn(1, IN, generator=generator)
    alone = layer(row)
    for others in (1, 3, 7, 15):
        batch = torch.randn(others + 1, IN, generator=generator) * 10.0 ** torch.randint(-2, 3, (others + 1, 1))
        batch[others // 2] = row
        assert torch.equal(layer(batch)[others // 2], alone[0])
        assert torch.equal(layer(batch[:, None])[others // 2, 0], alone[0])  # (B, T, C) as in the model
    mates = torch.cat([row, 50 * torch.randn(3, IN, generator=generator)])
    dynamic = torch.ops.quantized.linear_dynamic.default
    assert not torch.equal(dynamic(mates, layer._packed, True)[0], dynamic(row, layer._packed, True)[0])
