"""model/sampling.py: greedy parity with transformers, the KV cache against full recomputation,
seeds, the filters, the end-of-text stop and argument checks."""

import math

import pytest
import torch

from model import EOT_TOKEN, GPT, GPTConfig, generate

PROMPT = [464, 3290, 373, 257]
LONG_PROMPT = list(range(1000, 1020))  # longer than tiny_config's 16-token context


@pytest.fixture
def varied_model(tiny_model, make_varied):
    return make_varied(tiny_model)


def test_greedy_matches_transformers_generate(hf_gpt2, make_varied, tmp_path):
    config = GPTConfig.from_preset("tiny")  # 64 positions: transformers cannot go past n_positions
    hf = make_varied(hf_gpt2(config, std=0.3))  # wide weights: far-apart logits, no near-tie for rounding to flip
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=EOT_TOKEN,
            eos_token_id=EOT_TOKEN,
        )[0, len(PROMPT) :].tolist()
    ours = list(generate(model, PROMPT, 40, temperature=0))
    assert ours == expected
    assert len(ours) == 40 and len(set(ours)) > 10  # a varied sequence, not one token repeated
    with torch.no_grad():  # every choice clear: another instruction set's rounding cannot pick another token
        top2 = model(torch.tensor([PROMPT + ours[:-1]]))[0][0, len(PROMPT) - 1 :].topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_the_repetition_penalty_is_transformers_logits_processor(penalty):
    """penalize_repetition changes the logits exactly as RepetitionPenaltyLogitsProcessor does, repeated ids
    and negative logits included."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from model.sampling import penalize_repetition

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=generator) * 3
    seen = [5, 17, 17, 999, 0, 5, 400]
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits[None].clone())[0]
    assert torch.equal(penalize_repetition(logits, seen, penalty), theirs)
    assert not torch.equal(theirs, logits) and torch.equal(penalize_repetition(logits, seen, 1.0), logits)


def test_greedy_with_a_repetition_penalty_matches_transformers_generate(hf_gpt2, make_varied, tmp_path):
    """Within the context (the whole text is the window), greedy decoding with repetition_penalty writes what
    transformers' generate writes with the same penalty, and not what it writes without one."""
    config = GPTConfig.from_preset("tiny")
    hf = make_varied(hf_gpt2(config, std=0.3))
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                               repetition_penalty=1.5, pad_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)  # fmt: skip
    ours = list(generate(model, PROMPT, 40, temperature=0, repetition_penalty=1.5))
    assert ours == expected[0, len(PROMPT) :].tolist()
    assert ours != list(generate(model, PROMPT, 40, temperature=0))


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short-prompt", "prompt-longer-than-context"])
def test_kv_cache_matches_full_recomputation_across_the_context_limit(varied_model, greedy_by_recomputation, prompt):
    block_size = varied_model.config.block_size
    max_new_tokens = 60  # several times the 16-token context
    assert len(prompt) + max_new_tokens > 3 * block_size
    expected = greedy_by_recomputation(varied_model, prompt, max_new_tokens)
    assert len(set(expected)) > 10
    assert list(generate(varied_model, prompt, max_new_tokens, temperature=0)) == expected
    assert list(generate(varied_model, torch.tensor(prompt), max_new_tokens, temperature=0)) == expected


def test_same_seed_same_tokens_even_with_other_generation_in_between(tiny_model):
    reference = list(generate(tiny_model, PROMPT, 20, temperature=1.0, seed=1234))
    interrupted = generate(tiny_model, PROMPT, 20, temperature=1.0, seed=1234)
    first_half = [next(interrupted) for _ in range(10)]
    other = list(generate(tiny_model, PROMPT, 20, temperature=1.0, seed=99))
    torch.manual_seed(0)
    torch.rand(100)  # global RNG use in between must not matter either
    assert first_half + list(interrupted) == reference
    assert other != reference


def test_different_seeds_give_different_tokens(tiny_model):
    runs = {tuple(generate(tiny_model, PROMPT, 8, temperature=1.0, seed=seed)) for seed in range(5)}
    assert len(runs) == 5
    unseeded = {tuple(generate(tiny_model, PROMPT, 8, temperature=1.0)) for _ in range(3)}
    assert len(unseeded) == 3


def test_sampling_leaves_the_global_rng_and_training_mode_alone(tiny_model):
    tiny_model.train()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for seed in (7, None):
        stream = generate(tiny_model, PROMPT, 5, temperature=1.0, seed=seed)
        next(stream)
        assert not tiny_model.training  # no dropout while sampling
        stream.close()
        assert tiny_model.training
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=0),
        dict(temperature=1.0, top_k=1),
        dict(temperature=5.0, top_k=1, seed=3),
        dict(temperature=1.0, top_p=1e-9),
        dict(temperature=0.7, top_p=1e-6, top_k=50, seed=3),
    ],
    ids=["temperature-0.0", "temperature-int-0", "top_k-1", "top_k-1-hot", "top_p-tiny", "top_p-tiny-top_k-50"],
)
def test_degenerate_settings_are_greedy(varied_model, greedy_by_recomputation, settings):
    expected = greedy_by_recomputation(varied_model, PROMPT, 30)
    assert list(generate(varied_model, PROMPT, 30, **settings)) == expected


def first_step_probabilities(model: GPT, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([PROMPT]))
    return (logits[0, -1] / temperature).softmax(-1)


def first_tokens(model: GPT, **settings) -> set[int]:
    return {next(generate(model, PROMPT, 1, seed=seed, **settings)) for seed in range(40)}


def test_top_k_samples_only_the_k_most_likely(varied_model):
    allowed = set(first_step_probabilities(varied_model, 3.0).topk(3).indices.tolist())
    sampled = first_tokens(varied_model, temperature=3.0, top_k=3)
    assert sampled <= allowed and len(sampled) > 1


def test_top_p_samples_only_the_nucleus(varied_model):
    probs, order = first_step_probabilities(varied_model, 2.0).sort(descending=True)
    size = int((probs.cumsum(0) < 0.6).sum()) + 1  # the smallest set whose mass reaches 0.6
    nucleus = set(order[:size].tolist())
    sampled = first_tokens(varied_model, temperature=2.0, top_p=0.6)
    assert sampled <= nucleus and len(sampled) > 1


@pytest.fixture
def eot_model(tiny_model):
    """A model whose every next token is <|endoftext|>: the final norm outputs a constant that
    points along the end-of-text embedding."""
    with torch.no_grad():
        tiny_model.transformer.wte.weight[EOT_TOKEN] = 0.5
        tiny_model.transformer.ln_f.weight.zero_()
        tiny_model.transformer.ln_f.bias.copy_(10 * tiny_model.transformer.wte.weight[EOT_TOKEN])
    return tiny_model


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0, seed=0), dict(top_k=5, top_p=0.9)])
def test_generation_stops_right_after_end_of_text(eot_model, settings):
    assert list(generate(eot_model, PROMPT, 10, **settings)) == [EOT_TOKEN]


def test_max_new_tokens(tiny_model):
    assert list(generate(tiny_model, PROMPT, 0)) == []
    assert len(list(generate(tiny_model, PROMPT, 7, seed=0))) == 7


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
        (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=math.nan), r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be a whole number >= 0"),
        (dict(top_k=2.5), "top_k must be a whole number >= 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
        (dict(max_new_tokens=3.0), "max_new_tokens must be a non-negative integer"),
        (dict(prompt_ids=[]), "prompt_ids is empty"),
        (dict(prompt_ids=torch.tensor([], dtype=torch.long)), "prompt_ids is empty"),
        (dict(prompt_ids=[1, 50257]), r"prompt_ids must be token ids in \[0, 50257\)"),
        (dict(prompt_ids=[-1]), r"prompt_ids must be token ids in \[0, 50257\)"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(tiny_model, arguments, message):
    call = dict(prompt_ids=PROMPT, max_new_tokens=5) | arguments
    with pytest.raises(ValueError, match=message):
        next(generate(tiny_model, **call))
