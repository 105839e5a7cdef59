"""model/sampling.py semantics: the exact kept sets and distribution of temperature, top-k and top-p
against transformers' warpers, seeds, and tiny temperatures."""

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model import generate
from model.sampling import SETTINGS, SamplingError, SamplingParams, checked_number, sample_token

PROMPT = [464, 3290, 373, 257]
VOCAB = 12
DRAWS = 2000


def reference_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """transformers' warpers in generate()'s order (temperature, top-k, top-p): -inf marks a dropped token."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.double()[None])
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0]


def draw(logits: torch.Tensor, temperature: float, top_k, top_p, seed: int = 0, draws: int = DRAWS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    top_k, top_p = top_k or 0, 1.0 if top_p is None else top_p  # this file writes "off" as None; the API as 0 / 1
    tokens = [sample_token(logits, temperature, top_k, top_p, generator) for _ in range(draws)]
    return torch.bincount(torch.tensor(tokens), minlength=len(logits)).double() / draws


def assert_distribution(frequencies: torch.Tensor, expected: torch.Tensor, draws: int = DRAWS) -> None:
    """The same support, and each frequency within 4.5 standard deviations of its probability."""
    assert set(frequencies.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((frequencies - expected).abs() <= 4.5 * sigma + 1e-9).all(), (frequencies, expected)


def spread_logits(generator: torch.Generator, temperature: float) -> torch.Tensor:
    """Distinct logits whose values / temperature span [0, 2.5]: every token keeps over 0.5% of the mass."""
    values = torch.linspace(0, 2.5, VOCAB, dtype=torch.float64)[torch.randperm(VOCAB, generator=generator)]
    values = values + torch.rand(VOCAB, generator=generator, dtype=torch.float64) * 0.1
    return (values * temperature).float()


def nucleus_between(logits: torch.Tensor, temperature: float, top_k: int | None, size: int) -> float:
    """A top_p half-way between the mass of the `size - 1` and the `size` most likely candidates."""
    scaled = reference_logits(logits, temperature, top_k, None)
    mass = scaled.softmax(-1).sort(descending=True).values.cumsum(-1)
    return float((mass[size - 2] + mass[size - 1]) / 2) if size > 1 else float(mass[0] / 2)


CASES = [  # (temperature, top_k, nucleus size or None)
    (1.0, None, None),
    (0.5, None, None),
    (2.0, None, None),
    (1.0, 3, None),
    (0.7, 5, None),
    (3.0, VOCAB - 1, None),
    (1.0, None, 1),
    (1.0, None, 4),
    (0.5, None, 7),
    (2.5, None, VOCAB - 1),
    (1.5, 6, 3),
    (0.8, 9, 8),
]


@pytest.mark.parametrize("temperature, top_k, size", CASES)
@pytest.mark.parametrize("case", range(2))
def test_kept_set_and_distribution_match_transformers_warpers(temperature, top_k, size, case):
    """sample_token draws from softmax of the logits transformers' warpers keep, nothing else."""
    logits = spread_logits(torch.Generator().manual_seed(100 * case + len(str(CASES))), temperature)
    top_p = None if size is None else nucleus_between(logits, temperature, top_k, size)
    expected = reference_logits(logits, temperature, top_k, top_p)
    kept = int(torch.isfinite(expected).sum())
    assert kept == (size or top_k or VOCAB)
    assert_distribution(draw(logits, temperature, top_k, top_p, seed=case), expected.softmax(-1))


def test_top_k_keeps_exactly_k_tokens():
    """top_k=k can return each of the k most likely tokens and no other."""
    logits = torch.tensor([0.5, 3.0, 1.0, 2.9, 2.8, 0.0, 2.7, 1.5])
    for k in range(2, len(logits)):
        frequencies = draw(logits, 1.0, k, None, draws=600)
        assert set(frequencies.nonzero().flatten().tolist()) == set(logits.topk(k).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    """The nucleus is the smallest most-likely set whose mass reaches top_p: the token crossing it is kept."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    for top_p, size in [(0.35, 1), (0.45, 2), (0.65, 2), (0.75, 3), (0.85, 3), (0.95, 4)]:
        frequencies = draw(logits, 1.0, None, top_p, draws=600)
        assert set(frequencies.nonzero().flatten().tolist()) == set(range(size)), top_p


def test_top_p_stops_at_a_mass_exactly_equal_to_p():
    """Probabilities 1/2, 1/4, 1/4 (exact in float): top_p 0.5 keeps one token, as transformers does."""
    logits = torch.tensor([math.log(2.0), 0.0, 0.0])
    assert int(torch.isfinite(reference_logits(logits, 1.0, None, 0.5)).sum()) == 1
    assert set(draw(logits, 1.0, None, 0.5, draws=300).nonzero().flatten().tolist()) == {0}
    wider = set(draw(logits, 1.0, None, 0.51, draws=300).nonzero().flatten().tolist())
    assert 0 in wider and len(wider) == 2  # one of the tied quarter tokens joins


def test_temperature_scales_the_logits_before_sampling():
    """At temperature T the draws follow softmax(logits / T) on a 4-token vocabulary."""
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    for temperature in (0.5, 1.0, 2.0, 4.0):
        frequencies = draw(logits, temperature, None, None, seed=3, draws=4000)
        assert_distribution(frequencies, (logits.double() / temperature).softmax(-1), draws=4000)


def test_temperature_is_applied_before_the_nucleus_is_chosen():
    """A flatter temperature widens the top-p nucleus, as it does in transformers."""
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    top_p = 0.8  # at temperature 1 the nucleus is 2 tokens (0.66 + 0.24); at temperature 3 it is 3
    expected = reference_logits(logits, 3.0, None, top_p)
    assert int(torch.isfinite(expected).sum()) == 3
    assert_distribution(draw(logits, 3.0, None, top_p, seed=5), expected.softmax(-1))
    assert set(draw(logits, 1.0, None, top_p, seed=5).nonzero().flatten().tolist()) == {0, 1}


def test_bf16_logits_of_a_large_vocabulary_can_draw_every_token():
    """A GPU's bf16 logits are drawn from a distribution summed in fp32: in bf16 the cumulative sum of 4,096
    equal probabilities rounds to the same value over runs of up to 16 tokens near its end, and only the
    first of each run could ever be drawn."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.zeros(4096, dtype=torch.bfloat16)
    tokens = torch.tensor([sample_token(logits, 1.0, 0, 1.0, generator) for _ in range(2000)])
    assert 0.45 < (tokens >= 2048).float().mean() < 0.55
    assert len(set(tokens[tokens >= 2048].tolist())) > 600  # ~790 distinct of 2,048 expected; 128 in bf16


def test_top_k_then_top_p_renormalises_over_the_k():
    """With both filters, top-p measures mass within the top-k candidates (transformers' order)."""
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3])
    # over 8 tokens 3 reach 0.5 (0.43 before the third); over the top 3 only, 2 do (0.68)
    expected = reference_logits(logits, 1.0, 3, 0.5)
    assert int(torch.isfinite(expected).sum()) == 2
    assert_distribution(draw(logits, 1.0, 3, 0.5, seed=2), expected.softmax(-1))


def test_top_k_of_the_whole_vocabulary_or_more_is_off():
    """top_k >= vocabulary size and top_p 1 filter nothing."""
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5])
    expected = logits.double().softmax(-1)
    for top_k, top_p in [(4, None), (10, 1.0), (0, None), (None, 1.0)]:
        assert_distribution(draw(logits, 1.0, top_k, top_p, seed=1), expected)


TINY_TEMPERATURES = [1e-300, 1e-45, 1e-40, 1e-38, 5e-324, torch.finfo(torch.float32).tiny / 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (5, 0.9)])
def test_a_temperature_too_small_for_the_dtype_is_greedy_never_nan(dtype, top_k, top_p):
    """A temperature below the logits' dtype's smallest normal number (zero or subnormal there) gives the
    argmax, never a NaN or a crash, whatever the filters."""
    generator = torch.Generator().manual_seed(0)
    for seed in range(10):
        logits = (torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
        for temperature in TINY_TEMPERATURES:
            assert sample_token(logits, temperature, top_k, top_p, generator) == int(logits.argmax()), temperature


def test_the_smallest_normal_temperature_still_samples_and_shares_ties():
    """At the dtype's smallest normal temperature the logits are divided, so tied best logits share the draws
    (about evenly) and others never come."""
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.999])
    frequencies = draw(logits, torch.finfo(torch.float32).tiny, None, None, draws=1000)
    assert_distribution(frequencies, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64), draws=1000)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_tiny_temperature_generates_the_greedy_tokens(tiny_model, temperature):
    """generate() at a temperature too small for fp32 (as small as 1e-300) matches temperature 0."""
    greedy = list(generate(tiny_model, PROMPT, 12, temperature=0))
    assert list(generate(tiny_model, PROMPT, 12, temperature=temperature, seed=4)) == greedy


def test_greedy_settings_return_the_argmax_without_drawing():
    """Temperature 0 and top_k 1 return the argmax and leave the generator untouched."""
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    for temperature, top_k in [(0, 0), (0.0, 5), (1.0, 1), (50.0, 1)]:
        generator = torch.Generator().manual_seed(9)
        state = generator.get_state()
        assert sample_token(logits, temperature, top_k, 0.5, generator) == 1
        assert torch.equal(generator.get_state(), state)


def test_seed_zero_is_a_real_seed(tiny_model):
    """Seed 0 repeats itself and differs from seed 1; it is not taken for 'no seed'."""
    assert SamplingParams(seed=0).seed == 0
    runs = [tuple(generate(tiny_model, PROMPT, 8, temperature=1.0, seed=0)) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != tuple(generate(tiny_model, PROMPT, 8, temperature=1.0, seed=1))
    assert tuple(generate(tiny_model, PROMPT, 8, params=SamplingParams(1.0, seed=0))) == runs[0]


def test_seed_none_is_random_and_recorded():
    """Seed None draws a fresh 63-bit seed each time, recorded in the params."""
    seeds = [SamplingParams().seed for _ in range(8)]
    assert len(set(seeds)) == 8 and all(isinstance(s, int) and 0 <= s <= SamplingParams.SEED_MAX for s in seeds)
    assert any(s >= 2**40 for s in seeds)  # the whole 63-bit range, not a small one


def test_generate_passes_every_setting_to_the_sampler(tiny_model):
    """generate()'s keyword settings and params= give the same tokens as SamplingParams with those values."""
    settings = dict(temperature=1.3, top_k=7, top_p=0.8, seed=11)
    by_keywords = list(generate(tiny_model, PROMPT, 10, **settings))
    assert list(generate(tiny_model, PROMPT, 10, params=SamplingParams(**settings))) == by_keywords
    for changed in (dict(temperature=0.4), dict(top_k=2), dict(top_p=0.3), dict(seed=12)):
        assert list(generate(tiny_model, PROMPT, 10, **(settings | changed))) != by_keywords, changed


def test_n_tokens_take_n_forward_passes(tiny_model, monkeypatch):
    """A prefill then one step per further token: no forward pass after the last token or an end-of-text."""
    calls = []
    original = tiny_model.next_token_logits
    monkeypatch.setattr(tiny_model, "next_token_logits", lambda *args: calls.append(args[2]) or original(*args))
    assert len(list(generate(tiny_model, PROMPT, 6, temperature=0))) == 6
    assert calls == [0, 4, 5, 6, 7, 8]  # the input positions: the prompt at 0, then each new token after it
    calls.clear()
    assert len(list(generate(tiny_model, PROMPT, 1, temperature=0))) == 1 and calls == [0]


def test_generate_defaults_are_sampling_params_defaults(tiny_model):
    """generate()'s defaults are SamplingParams' (temperature 0.8, no top-k or top-p), and off is 0 / 1 only."""
    with torch.no_grad():
        tiny_model.transformer.ln_f.weight.mul_(30)  # logits far enough apart for the temperature to show
    default = list(generate(tiny_model, PROMPT, 8, seed=5))
    assert default == list(generate(tiny_model, PROMPT, 8, params=SamplingParams(seed=5)))
    assert default == list(generate(tiny_model, PROMPT, 8, temperature=0.8, top_k=0, top_p=1.0, seed=5))
    assert default != list(generate(tiny_model, PROMPT, 8, temperature=2.0, seed=5))
    for left_out in (dict(top_k=None), dict(top_p=None), dict(repetition_penalty=None)):  # None: the default
        assert default == list(generate(tiny_model, PROMPT, 8, seed=5, **left_out))
    with pytest.raises(TypeError, match="not both"):
        generate(tiny_model, PROMPT, 8, params=SamplingParams(seed=5), seed=5)


def test_prompt_ids_cover_the_whole_vocabulary(tiny_model):
    """Token ids 0 and vocab_size - 1 are valid prompts; an empty prompt says exactly what to give."""
    last = tiny_model.config.vocab_size - 1
    for prompt in ([0], [last], torch.tensor([0, last])):
        assert len(list(generate(tiny_model, prompt, 2, temperature=0))) == 2
    with pytest.raises(SamplingError) as error:
        generate(tiny_model, [], 2)
    assert str(error.value) == "prompt_ids is empty: give at least one token (e.g. the end-of-text token 50256)"


def test_defaults_and_off_values():
    """The defaults: temperature 0.8, top_k 0 (off), top_p 1 (off), repetition_penalty 1 (off); what an app serves
    and what its visitors start from (top_k 50)."""
    params = SamplingParams(seed=1)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.8, 0, 1.0, 1.0)
    assert SamplingParams(seed=1, served=True) == SamplingParams(0.8, 50, 1.0, 1, 1.0)
    served = {name: setting.served for name, setting in SETTINGS.items()}
    assert served == {"temperature": (0.0, 2.0), "top_k": (0, 200), "top_p": (0.05, 1.0), "repetition_penalty": (1, 2)}


@pytest.mark.parametrize(
    "value, low, high, whole, expected",
    [(3, 0, 5, False, 3.0), (0, 0, 5, True, 0), (5.0, 0, 5, True, 5), (0.0, 0.0, 1.0, False, 0.0), (1, 1, 1, True, 1)],
)
def test_checked_number_accepts_its_closed_range(value, low, high, whole, expected):
    """checked_number accepts both ends of [low, high] and returns an int for whole numbers."""
    got = checked_number("x", value, low, high, "allowed", whole)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value, whole, shown",
    [
        (True, False, "x must be allowed; got bool True"),
        ("3", False, "x must be allowed; got str '3'"),
        (None, False, "x must be allowed; got NoneType None"),
        (-0.001, False, "x must be allowed; got -0.001"),
        (5.001, False, "x must be allowed; got 5.001"),
        (2.5, True, "x must be allowed; got 2.5"),
        (math.inf, False, "x must be allowed; got inf"),
        (math.nan, False, "x must be allowed; got nan"),
        (10**400, True, "x must be allowed; got " + "1" + "0" * 36 + "..."),
        ("y" * 50, False, "x must be allowed; got str '" + "y" * 36 + "..."),
    ],
)
def test_checked_number_refuses_with_the_exact_message(value, whole, shown):
    """Out-of-range, non-finite, non-whole and non-numbers raise SamplingError echoing at most 40 characters."""
    with pytest.raises(SamplingError) as error:
        checked_number("x", value, 0, 5, "allowed", whole)
    assert str(error.value) == shown


def test_shown_values_of_exactly_40_characters_are_kept_whole():
    """A value whose repr is 40 characters is echoed in full; 41 are cut to 37 plus '...'."""
    for length, shown in [(38, "'" + "a" * 38 + "'"), (39, "'" + "a" * 36 + "...")]:
        with pytest.raises(SamplingError) as error:
            checked_number("x", "a" * length, 0, 1, "allowed")
        assert str(error.value) == f"x must be allowed; got str {shown}"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(temperature=-1e-9), "temperature must be a finite number >= 0 (0 = greedy); got -1e-09"),
        (dict(top_k=-1), "top_k must be a whole number >= 0 (0 = off); got -1"),
        (dict(top_k=1.5), "top_k must be a whole number >= 0 (0 = off); got 1.5"),
        (dict(top_p=0.0), "top_p must be a number in (0, 1] (1 = off); got 0.0"),
        (dict(top_p=1.0000001), "top_p must be a number in (0, 1] (1 = off); got 1.0000001"),
        (dict(seed=-1), f"seed must be blank, -1 (random) or a whole number from 0 to {2**63 - 1}; got -1"),
        (dict(seed=2**63), f"seed must be blank, -1 (random) or a whole number from 0 to {2**63 - 1}; got {2**63}"),
        (dict(seed=1.5), f"seed must be blank, -1 (random) or a whole number from 0 to {2**63 - 1}; got 1.5"),
        (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0 (1 = off); got 0"),
    ],
)
def test_sampling_params_refuse_out_of_range_values(changes, message):
    """SamplingParams names the setting, its allowed range and the value."""
    with pytest.raises(SamplingError) as error:
        SamplingParams(**changes)
    assert str(error.value) == message


def test_sampling_params_accept_their_range_ends():
    """The smallest and largest allowed values are kept, normalised to float / int."""
    params = SamplingParams(temperature=0, top_k=3.0, top_p=math.ulp(0.0), seed=float(2**52))
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (0.0, 3, math.ulp(0.0), 2**52)
    assert type(params.temperature) is float and type(params.top_k) is int and type(params.seed) is int
    assert SamplingParams(top_p=1, seed=SamplingParams.SEED_MAX).seed == 2**63 - 1
    assert type(SamplingParams(top_p=1, seed=0).top_p) is float


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(temperature=2.01), "temperature must be a number from 0 to 2 (0 = greedy); got 2.01"),
        (dict(temperature=-0.1), "temperature must be a number from 0 to 2 (0 = greedy); got -0.1"),
        (dict(top_k=201), "top_k must be a whole number from 0 to 200 (0 = off); got 201"),
        (dict(top_k=-1), "top_k must be a whole number from 0 to 200 (0 = off); got -1"),
        (dict(top_k=2.5), "top_k must be a whole number from 0 to 200 (0 = off); got 2.5"),
        (dict(top_p=0.049), "top_p must be a number from 0.05 to 1 (1 = off); got 0.049"),
        (dict(top_p=1.01), "top_p must be a number from 0.05 to 1 (1 = off); got 1.01"),
        (dict(seed=-2), "seed must be blank, -1 (random) or a whole number from 0 to"),
        (dict(seed=True), "seed must be blank, -1 (random) or a whole number from 0 to"),
        (dict(seed="-1"), "seed must be blank, -1 (random) or a whole number from 0 to"),
        (dict(repetition_penalty=0.99), "repetition_penalty must be a number from 1 to 2 (1 = off); got 0.99"),
        (dict(repetition_penalty=2.01), "repetition_penalty must be a number from 1 to 2 (1 = off); got 2.01"),
    ],
)
def test_served_ranges_are_enforced_with_their_message(changes, message):
    """SamplingParams(served=True) refuses values outside the served ranges, saying the served range."""
    settings = dict(temperature=0.8, top_k=50, top_p=1.0, seed=1) | changes
    with pytest.raises(SamplingError) as error:
        SamplingParams(**settings, served=True)
    assert str(error.value).startswith(message)


def test_served_accepts_its_range_ends_and_random_seeds():
    """Served settings accept both ends of each range; None, -1 and -1.0 draw a random seed, 0 is seed 0; a
    setting left None is what a visitor starts from."""
    low = SamplingParams(0, 0, 0.05, 0, 1, served=True)
    high = SamplingParams(2, 200, 1, SamplingParams.SEED_MAX, 2, served=True)
    assert (low.temperature, low.top_k, low.top_p, low.seed, low.repetition_penalty) == (0.0, 0, 0.05, 0, 1.0)
    assert (high.temperature, high.top_k, high.top_p, high.seed) == (2.0, 200, 1.0, 2**63 - 1)
    for seed in (None, -1, -1.0):
        assert len({SamplingParams(1, 1, 1, seed, served=True).seed for _ in range(4)}) == 4
    left_out = SamplingParams(seed=3, served=True)
    assert [getattr(left_out, name) for name in SETTINGS] == [setting.start for setting in SETTINGS.values()]


# -- serve/completions.py: the request checks in front of the sampler


@pytest.fixture(scope="module")
def tiny_gpt():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval()


class CountingTokenizer:
    """A stand-in tokenizer: one id per character, counting its calls."""

    calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [ord(c) for c in text]


def test_check_prompt_encodes_with_the_tokenizer_given_or_gpt2():
    """check_prompt returns the prompt's ids from the tokenizer given, else GPT-2's."""
    from model import load_tokenizer
    from serve.completions import check_prompt

    tokenizer = CountingTokenizer()
    assert check_prompt("ROMEO:", tokenizer) == [ord(c) for c in "ROMEO:"] and tokenizer.calls == 1
    assert check_prompt(" x ") == load_tokenizer().encode(" x ")


@pytest.mark.parametrize(
    "prompt, message",
    [
        (123, "prompt must be text (a string); got int '123'"),
        (None, "prompt must be text (a string); got NoneType 'None'"),
        (["a"] * 20, "prompt must be text (a string); got list " + repr(str(["a"] * 20)[:40])),
        ("", "prompt is empty: type some text for the model to continue, e.g. 'ROMEO:'"),
        (" \n\t ", "prompt is empty: type some text for the model to continue, e.g. 'ROMEO:'"),
        (
            "a" * 100_001,
            "prompt is 100,001 characters; at most 100,000 are allowed "
            "(the model reads only the last context of tokens)",
        ),
    ],
)
def test_check_prompt_refuses_with_the_exact_message(prompt, message):
    """Non-text, blank and over-long prompts are refused, saying what is allowed."""
    from serve.completions import RequestError, check_prompt

    with pytest.raises(RequestError) as error:
        check_prompt(prompt, CountingTokenizer())
    assert str(error.value) == message


def test_check_prompt_accepts_the_longest_prompt():
    """A prompt of exactly MAX_PROMPT_CHARS characters is accepted."""
    from serve.completions import MAX_PROMPT_CHARS, check_prompt

    assert MAX_PROMPT_CHARS == 100_000
    assert len(check_prompt("a" * MAX_PROMPT_CHARS, CountingTokenizer())) == MAX_PROMPT_CHARS


def test_check_request_builds_the_request(tiny_gpt):
    """check_request returns the prompt, its ids, the model's context, max_new_tokens and served params."""
    from serve.completions import check_request

    tokenizer = CountingTokenizer()
    request = check_request(tiny_gpt, "ROMEO:", 64.0, SamplingParams(1.5, 7, 0.5, 3, served=True), tokenizer)
    assert request.prompt == "ROMEO:" and request.prompt_ids == [ord(c) for c in "ROMEO:"] and tokenizer.calls == 1
    assert request.context == tiny_gpt.config.block_size == 64
    assert request.max_new_tokens == 64 and type(request.max_new_tokens) is int
    assert request.params == SamplingParams(1.5, 7, 0.5, 3) and request.seed == 3
    assert check_request(tiny_gpt, "ROMEO:", 1, SamplingParams(served=True)).max_new_tokens == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a whole number from 1 to 64; got 0"),
        (dict(max_new_tokens=65), "max_new_tokens must be a whole number from 1 to 64; got 65"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number from 1 to 64; got 2.5"),
        (dict(temperature=2.5), "temperature must be a number from 0 to 2 (0 = greedy); got 2.5"),
        (dict(top_k=201), "top_k must be a whole number from 0 to 200 (0 = off); got 201"),
        (dict(top_p=0.01), "top_p must be a number from 0.05 to 1 (1 = off); got 0.01"),
        (dict(prompt=""), "prompt is empty"),
    ],
)
def test_check_request_refuses_each_setting_with_its_message(tiny_gpt, changes, message):
    """Each out-of-range request setting is refused with a message naming it and its served range, by
    check_request (the prompt, max_new_tokens) or by SamplingParams(served=True) (the sampling settings): what
    a front end answers the caller with (serve.REFUSED)."""
    from serve.completions import REFUSED, check_request

    arguments = dict(prompt="ROMEO:", max_new_tokens=10, temperature=0.8, top_k=50, top_p=1.0, seed=1) | changes
    prompt, max_new_tokens = arguments.pop("prompt"), arguments.pop("max_new_tokens")
    with pytest.raises(REFUSED) as error:
        check_request(tiny_gpt, prompt, max_new_tokens, SamplingParams(**arguments, served=True), CountingTokenizer())
    assert str(error.value).startswith(message)
