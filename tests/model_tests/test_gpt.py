"""model/gpt.py and model/config.py: size, names, tying, forward, loss, initialisation, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

LAYER_NAMES = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]


def hf_names(n_layer: int) -> list[str]:
    """transformers.GPT2LMHeadModel's state-dict names, in order."""
    layers = [f"transformer.h.{i}.{name}" for i in range(n_layer) for name in LAYER_NAMES]
    return ["transformer.wte.weight", "transformer.wpe.weight", *layers, "transformer.ln_f.weight"] + [
        "transformer.ln_f.bias",
        "lm_head.weight",
    ]


@pytest.fixture(scope="module")
def gpt2_small():
    with torch.device("meta"):
        return GPT(GPTConfig())


def test_gpt2_small_has_124m_parameters(gpt2_small):
    assert sum(p.numel() for p in gpt2_small.parameters()) == 124_439_808
    assert gpt2_small.num_parameters() == 124_439_808


def test_parameter_names_are_hugging_face_gpt2_names(gpt2_small):
    assert list(gpt2_small.state_dict()) == hf_names(12)
    shapes = {name: tuple(t.shape) for name, t in gpt2_small.state_dict().items()}
    assert shapes["transformer.wte.weight"] == (50257, 768)
    assert shapes["transformer.wpe.weight"] == (1024, 768)
    assert shapes["transformer.h.11.attn.c_attn.weight"] == (3 * 768, 768)  # nn.Linear (out, in)
    assert shapes["transformer.h.11.mlp.c_fc.weight"] == (4 * 768, 768)
    assert shapes["lm_head.weight"] == (50257, 768)


def test_names_match_transformers(tiny_config, hf_gpt2):
    hf_state = hf_gpt2(tiny_config).state_dict()
    hf_weights = [name for name in hf_state if not name.endswith((".attn.bias", ".attn.masked_bias"))]
    assert list(GPT(tiny_config).state_dict()) == hf_weights == hf_names(tiny_config.n_layer)


def test_lm_head_is_tied_to_the_token_embedding(gpt2_small, tiny_model):
    for model in (gpt2_small, tiny_model):
        assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before, _ = tiny_model(idx)
        tiny_model.transformer.wte.weight[7] += 1.0  # token 7 is neither input nor special
        after, _ = tiny_model(idx)
    changed = (after - before).abs().amax(dim=(0, 1))
    assert changed[7] > 0.1 and changed[8] == 0


def test_forward_returns_logits_and_mean_cross_entropy(tiny_model, tiny_config):
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, tiny_config.vocab_size, (3, 10), generator=generator)
    targets = torch.randint(0, tiny_config.vocab_size, (3, 10), generator=generator)
    with torch.no_grad():
        logits, loss = tiny_model(idx)
        assert logits.shape == (3, 10, tiny_config.vocab_size) and loss is None
        logits_again, loss = tiny_model(idx, targets)
    assert torch.equal(logits, logits_again)
    expected = F.cross_entropy(logits.reshape(-1, tiny_config.vocab_size), targets.reshape(-1))
    assert loss.shape == () and torch.allclose(loss, expected, atol=1e-6)
    # a random model is close to uniform: loss near ln(vocab)
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 1.0


def test_loss_ignores_targets_of_minus_one(tiny_model):
    idx = torch.tensor([[5, 6, 7, 8]])
    targets = torch.tensor([[6, 7, -1, -1]])
    with torch.no_grad():
        logits, loss = tiny_model(idx, targets)
    expected = F.cross_entropy(logits[0, :2], targets[0, :2])
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("tokens, changed", [([10, 11, 12, 13, 14], 3), ([10, 11], 1)])
def test_forward_is_causal(tiny_model, tokens, changed):
    """Changing a later token never changes the logits of earlier positions (also in a 2-token sequence)."""
    other = tokens[:changed] + [99] + tokens[changed + 1 :]
    with torch.no_grad():
        a, _ = tiny_model(torch.tensor([tokens]))
        b, _ = tiny_model(torch.tensor([other]))
    assert torch.equal(a[0, :changed], b[0, :changed])
    assert not torch.allclose(a[0, changed:], b[0, changed:])


def test_dropout_acts_in_training_only(tiny_model, tiny_config):
    """With dropout set, eval mode (generation, held-out loss) gives the plain model's logits every time;
    training mode drops something on every call."""
    dropping = GPT(GPTConfig(**{**vars(tiny_config), "dropout": 0.3}))
    dropping.load_state_dict(tiny_model.state_dict())
    idx = torch.tensor([[10, 11, 12, 13, 14]])
    with torch.no_grad():
        plain, _ = tiny_model.eval()(idx)
        assert all(torch.equal(dropping.eval()(idx)[0], plain) for _ in range(3))
        dropping.train()
        assert not torch.allclose(dropping(idx)[0], dropping(idx)[0])


def test_longer_than_the_context_is_refused(tiny_model, tiny_config):
    idx = torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence of 17 tokens is longer than the context \(16\); crop it"):
        tiny_model(idx)


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert param.std().item() == pytest.approx(residual_std, rel=0.05), name
            assert abs(param.mean().item()) < residual_std / 20, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(param.mean().item()) < 0.001, name
        elif name.endswith(".bias"):
            assert torch.all(param == 0), name
        else:
            assert name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")), name
            assert torch.all(param == 1), name


@pytest.mark.parametrize("chunks", [[(0, 5), (5, 8), (8, 9), (9, 11)], [(0, 2), (2, 3), (3, 11)]])
def test_cached_chunks_give_the_full_forward_logits(tiny_model, chunks):
    """Prefill, then a multi-token chunk, then single tokens through the KV cache: every last
    position's logits equal those of one forward pass over the whole sequence."""
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    with torch.no_grad():
        full, _ = tiny_model(idx)
        cache = tiny_model.new_kv_cache()
        for start, end in chunks:
            last = tiny_model.next_token_logits(idx[:, start:end], cache, start=start)
            torch.testing.assert_close(last, full[:, end - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(block_size=16.0), "block_size"),
    ],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)


def test_presets():
    assert GPTConfig.from_preset("gpt2") == GPTConfig()
    assert GPTConfig.from_preset("tiny", n_layer=3, n_head=None).n_layer == 3
    with pytest.raises(ValueError, match="unknown preset 'huge'.*cpu-small"):
        GPTConfig.from_preset("huge")


def test_old_names_still_work_saying_so_once(tiny_model):
    """model.PRESETS (now SHAPES, apart from the trainer's RECIPES) and next_token_logits' input_pos= (now
    start=) keep working, each with a deprecation warning naming the new spelling."""
    import model

    with pytest.warns(DeprecationWarning, match="use model.SHAPES"):
        assert model.PRESETS is model.SHAPES
    idx = torch.tensor([[5, 6]])
    with torch.no_grad():
        expected = tiny_model.next_token_logits(idx, tiny_model.new_kv_cache(), start=0)
        with pytest.warns(DeprecationWarning, match="input_pos= is deprecated: call it start="):
            assert torch.equal(tiny_model.next_token_logits(idx, tiny_model.new_kv_cache(), input_pos=0), expected)
        with pytest.raises(TypeError, match="give start"):
            tiny_model.next_token_logits(idx, tiny_model.new_kv_cache())


def test_a_new_kv_cache_holds_zeros_even_where_freed_memory_held_nan(tiny_model):
    """The batched decoding step multiplies the positions it masks out by a weight of 0: they must be finite,
    so every new cache starts at zero, whatever the memory it gets held before."""
    for rows in (1, 3, 1, 3):
        cache = tiny_model.new_kv_cache(rows)
        tensors = cache.keys + cache.values
        assert all(t.shape[0] == rows and t.dtype == torch.float32 and not t.any() for t in tensors)
        for t in tensors:
            t.fill_(float("nan"))
        del cache, tensors


def test_cached_rows_need_a_start_and_a_slot_each(tiny_model):
    """Per-row positions and cache slots: one of each per row, positions >= 0, inside the context."""
    cache, idx = tiny_model.new_kv_cache(3), torch.tensor([[1], [2]])
    with torch.no_grad():
        for starts, slots in (([0], [0, 1]), ([0, 1], [0]), ([-1, 0], [0, 1])):
            with pytest.raises(ValueError, match="2 rows need 2 start positions"):
                tiny_model.next_token_logits(idx, cache, starts, slots)
        with pytest.raises(ValueError, match="longer than the context"):
            tiny_model.next_token_logits(idx, cache, [0, tiny_model.config.block_size], [0, 2])
        assert tiny_model.next_token_logits(idx, cache, [0, 5], [2, 0]).shape == (2, tiny_model.config.vocab_size)
