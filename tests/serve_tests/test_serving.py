"""serve/completions.py and serve/model_facts.py: request checks, the streamed completion and its figures,
the model's facts."""

import copy
import itertools
import math
import time

import pytest
import torch

from model import GPT, GPTConfig, SamplingParams, generate, load_tokenizer, render_model_card, stream_text
from serve import REFUSED, ModelFacts, Scheduler, check_request, model_facts, stream_completion

SEED_MAX = SamplingParams.SEED_MAX


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def scheduler(tiny):
    with Scheduler(tiny) as running:
        yield running


def request(model, **changes):
    """A request checked as the app checks one: its sampling settings by SamplingParams(served=True), the rest by
    check_request."""
    arguments = dict(prompt="ROMEO:", max_new_tokens=10, temperature=0.8, top_k=50, top_p=1.0, seed=1) | changes
    prompt, max_new_tokens = arguments.pop("prompt"), arguments.pop("max_new_tokens")
    return check_request(model, prompt, max_new_tokens, SamplingParams(**arguments, served=True))


def test_json_numbers_are_normalised(tiny):
    checked = request(tiny, max_new_tokens=20.0, temperature=1, top_k=0.0, top_p=1, seed=7.0)
    params = checked.params
    values = (checked.max_new_tokens, params.temperature, params.top_k, params.top_p, checked.seed)
    assert values == (20, 1.0, 0, 1.0, 7)
    assert isinstance(checked.max_new_tokens, int) and isinstance(checked.seed, int)


@pytest.mark.parametrize("seed", [None, -1, -1.0])
def test_a_random_seed_is_drawn_and_recorded(tiny, seed):
    seeds = {request(tiny, seed=seed).seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s <= SEED_MAX for s in seeds)


@pytest.mark.parametrize(
    "name, value",
    [("max_new_tokens", math.nan), ("temperature", math.inf), ("top_p", -math.inf), ("top_k", "50"), ("seed", 10**400)],
)
def test_non_finite_huge_and_missing_numbers_are_refused(tiny, name, value):
    with pytest.raises(REFUSED, match=f"{name} must be"):
        request(tiny, **{name: value})


def test_errors_never_echo_a_huge_value(tiny):
    with pytest.raises(REFUSED) as error:
        request(tiny, temperature="x" * 10_000)
    assert len(str(error.value)) < 200


def test_long_prompt_is_cropped_to_the_context(tiny):
    checked = request(tiny, prompt="To be or not to be, that is the question. " * 20)
    ids = load_tokenizer().encode(checked.prompt)
    assert checked.cropped and checked.prompt_ids == ids and len(ids) > checked.context == 64
    assert not request(tiny).cropped


def test_stream_completion_grows_from_the_prompt_and_counts_tokens(tiny, scheduler):
    checked = request(tiny, max_new_tokens=15, temperature=0)
    items = [(text, stats.new_tokens) for text, stats in stream_completion(scheduler, checked)]
    texts = [text for text, _ in items]
    assert texts[0] == "ROMEO:" and items[0][1] == 0
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    tokenizer = load_tokenizer()
    new_ids = list(generate(tiny, tokenizer.encode("ROMEO:"), 15, temperature=0))
    assert texts[-1] == "ROMEO:" + "".join(stream_text(new_ids, tokenizer))
    *_, (_, stats) = stream_completion(scheduler, checked)
    assert stats.new_tokens == len(new_ids) and stats.seconds > 0 and stats.first_token_seconds <= stats.seconds
    assert stats.tokens_per_second == pytest.approx(stats.new_tokens / stats.seconds)
    assert f"{stats.new_tokens} tokens in" in stats.summary() and f"seed {checked.seed}" in stats.summary()


def test_updates_are_coalesced_but_the_first_token_is_shown_at_once(tiny, scheduler):
    checked = request(tiny, max_new_tokens=15, temperature=0)
    every = [(text, stats.new_tokens) for text, stats in stream_completion(scheduler, checked, update_seconds=0)]
    rare = [(text, stats.new_tokens) for text, stats in stream_completion(scheduler, checked, update_seconds=60)]
    assert len(every) >= 15 and [n for _, n in rare] == [0, 1, 15]  # prompt, first token, the end
    assert rare[0][0] == every[0][0] and rare[1][0] == every[1][0] and rare[-1][0] == every[-1][0]


def test_updates_thin_out_while_many_requests_run(tiny, scheduler, monkeypatch, slow_steps):
    """All streams together update at most 20 times a second: with 400 requests running one stream shows
    only the prompt, its first token (at once) and the end; alone it updates every 50 ms (steps of 10 ms)."""
    slow_steps(0.01)
    checked = request(tiny, max_new_tokens=15, temperature=0)
    monkeypatch.setattr(Scheduler, "running", property(lambda self: 400))
    busy = [stats.new_tokens for _, stats in stream_completion(scheduler, checked, update_seconds=0.001)]
    assert busy == [0, 1, 15]
    monkeypatch.setattr(Scheduler, "running", property(lambda self: 1))
    alone = [time.perf_counter() for _ in stream_completion(scheduler, checked, update_seconds=0.001)]
    shown = alone[1:-1]  # when each update came, from the first token to the last one before the end
    assert len(shown) >= 3 and all(b - a >= 0.045 for a, b in itertools.pairwise(shown))  # ~150 ms of tokens


def test_crop_is_noted_in_the_summary(tiny, scheduler):
    checked = request(tiny, prompt="ROMEO: " * 100, max_new_tokens=2)
    *_, (_, stats) = stream_completion(scheduler, checked)
    assert "only its last 64 tokens" in stats.summary()


def test_model_facts_read_the_card_and_the_curve(tiny, tmp_path):
    tiny.save_pretrained(
        tmp_path / "with", model_card=render_model_card(tiny.config, {"train_loss": 0.5, "val_loss": 2})
    )
    (tmp_path / "with" / "loss_curve.png").write_bytes(b"png")
    rows = dict(ModelFacts.of(tiny, tmp_path / "with").rows())
    assert rows["train loss"] == "0.5000" and rows["held-out loss"] == "2.0000"
    assert rows["parameters"] == f"{tiny.num_parameters():,}"
    assert ModelFacts.of(tiny, tmp_path / "with").loss_curve == tmp_path / "with" / "loss_curve.png"

    tiny.save_pretrained(tmp_path / "without")
    facts = ModelFacts.of(tiny, tmp_path / "without" / "model.safetensors")
    assert facts.loss_curve is None and "not recorded" in dict(facts.rows())["train loss"]


FINE_TUNE_NOTE = "Its axis counts the fine-tune's own steps, 1-60; the 1,000 before it are not drawn."


@pytest.mark.parametrize(
    "metrics, label, note",
    [
        ({"steps": 60}, "Loss curve", ""),  # one run: the curve draws all its steps
        ({}, "Loss curve", ""),
        ({"steps": 1060, "init": "a base (1,000 steps)"}, "Loss curve: fine-tune steps 1,001-1,060", FINE_TUNE_NOTE),
        ({"steps": 60, "init": "a Hub model"}, "Loss curve: the last fine-tune only", ""),  # its base's steps unknown
    ],
)
def test_the_curve_label_says_which_steps_it_draws(tiny, tmp_path, metrics, label, note):
    """A fine-tune's card (its `init` records the run it started from) may count both runs' steps, but its curve
    draws the fine-tune's alone: the label says which, and the facts give the base run's own figures."""
    tiny.save_pretrained(tmp_path, model_card=render_model_card(tiny.config, metrics))
    facts = ModelFacts.of(tiny, tmp_path)
    assert (facts.curve_label(), facts.curve_note()) == (label, note)
    assert dict(facts.rows()).get("started from") == metrics.get("init")


def test_the_shipped_curve_is_labelled_as_the_last_fine_tune(tiny, root):
    """The shipped card counts 1,060 steps over two runs; its curve draws the 60-step fine-tune's."""
    facts = ModelFacts.of(tiny, root / "assets")  # the facts of the card and curve; the weights are tiny's
    assert (facts.curve_label(), facts.curve_note()) == ("Loss curve: fine-tune steps 1,001-1,060", FINE_TUNE_NOTE)
    assert "1,000 steps of --preset cpu" in dict(facts.rows())["started from"]


def test_the_weights_are_described_without_server_paths(tiny, tmp_path, monkeypatch):
    """The panel says where the weights came from in a visitor's terms: the shipped model, a Hub repo
    id@revision, or a local folder's or file's name; never an absolute path of the server."""
    tiny.save_pretrained(tmp_path / "runs" / "best")
    shipped, folder = tmp_path / "runs", tmp_path / "runs" / "best"
    assert ModelFacts.of(tiny, folder, shipped=folder).description == "the model shipped with the app"
    assert ModelFacts.of(tiny, folder, shipped=shipped).description == "local folder best"
    assert ModelFacts.of(tiny, folder / "model.safetensors").description == "local file model.safetensors"
    snapshot = tmp_path / "models--me--gpt" / "snapshots" / ("0123456789ab" + "c" * 28)
    tiny.save_pretrained(snapshot)
    monkeypatch.setattr(model_facts, "resolve", lambda source: snapshot)
    assert ModelFacts.of(tiny, "me/gpt").description == "Hub repo me/gpt@0123456789ab"
    assert ModelFacts.of(tiny, "me/gpt@v1").description == "Hub repo me/gpt@v1"
    rows = ModelFacts.of(tiny, "me/gpt").rows()
    assert not any(str(tmp_path) in value for _, value in rows)


def test_a_broken_model_card_leaves_the_losses_unrecorded(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, model_card="---\ntraining_metrics: [unclosed\n---\n")
    assert "not recorded" in dict(ModelFacts.of(tiny, tmp_path).rows())["held-out loss"]


def test_closing_the_completion_frees_its_row(tiny, monkeypatch, slow_steps, wait_until):
    """A reader that stops reading (Gradio closes the generator on Stop or a disconnect) takes its request
    out of the batch at once, not when its tokens would have run out."""
    slow_steps(0.05)  # 64 tokens: 3 s
    with Scheduler(tiny) as scheduler:
        completion = stream_completion(scheduler, request(tiny, max_new_tokens=64), update_seconds=0)
        next(completion), next(completion)  # the prompt, then the first token
        assert scheduler.running == 1
        completion.close()
        assert wait_until(lambda: scheduler.running == 0, seconds=0.5)


# -- the probability view: each generated token's probability and the top alternatives, from the sampler's logits


@pytest.fixture(scope="module")
def peaked(perturb, make_varied):
    """A tiny model whose next-token distributions are far from flat, so probabilities tell tokens apart."""
    torch.manual_seed(0)
    return make_varied(perturb(GPT(GPTConfig.from_preset("tiny")))).eval()


def plain_forward_probabilities(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """softmax at temperature 1 of a plain forward pass (no cache) over prompt + generated tokens: row i is the
    distribution the i-th generated token was drawn from."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt_ids + new_ids]))
    return logits[0, len(prompt_ids) - 1 : -1].float().softmax(-1)


def assert_probabilities_match(records, expected: torch.Tensor, tolerance: float) -> None:
    """Each record's p and top agree with the expected distribution within tolerance; at fp32 rounding the top
    five are the same tokens in the same order (in int8, near-equal alternatives may swap places)."""
    assert len(records) == len(expected)
    for record, row in zip(records, expected, strict=True):
        assert abs(record.p - float(row[record.id])) <= tolerance
        top = row.topk(5)
        assert all(abs(p - float(row[token])) <= tolerance for token, p in record.top)
        assert all(abs(p - float(q)) <= tolerance for (_, p), q in zip(record.top, top.values, strict=True))
        if tolerance < 1e-4:
            assert [token for token, _ in record.top] == top.indices.tolist()


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.3, top_k=3, top_p=0.9)])
def test_probabilities_are_the_models_own_before_any_filter(peaked, settings):
    """p and top are the softmax at temperature 1 of the very logits the token was drawn from, whatever the
    temperature, top-k and top-p: equal to a plain forward pass over the same tokens (fp32: to rounding)."""
    params = SamplingParams(**settings, seed=3)
    with Scheduler(peaked) as scheduler:
        stream = scheduler.generate([464, 3290, 373], 12, params, probabilities=True)
        new_ids = list(stream)
        assert list(scheduler.generate([464, 3290, 373], 12, params)) == new_ids  # the view changes no token
    assert [record.id for record in stream.probabilities] == new_ids
    expected = plain_forward_probabilities(peaked, [464, 3290, 373], new_ids)
    assert_probabilities_match(stream.probabilities, expected, 1e-5)
    assert max(record.p for record in stream.probabilities) > 0.1  # a distribution that tells tokens apart


def test_each_row_has_its_own_probabilities_in_a_batch(peaked):
    """Rows decoded together each get the probabilities of their own tokens."""
    with Scheduler(peaked, max_batch=4) as batched:
        prompts = [[464, 3290, 373], [11, 12], list(range(300, 320))]
        streams = [
            batched.generate(p, 10, SamplingParams(1.0, seed=i), probabilities=True) for i, p in enumerate(prompts)
        ]
        outputs = [list(stream) for stream in streams]
    for prompt, stream, new_ids in zip(prompts, streams, outputs, strict=True):
        assert_probabilities_match(stream.probabilities, plain_forward_probabilities(peaked, prompt, new_ids), 1e-5)


def test_int8_probabilities_match_a_plain_forward_pass_within_two_hundredths(peaked):
    """On the default CPU path (int8 weights) the cached, batched decoder's probabilities stay within 0.02 of a
    plain forward pass of the same int8 model over the same tokens."""
    from serve.inference import int8_supported
    from serve.kernels import quantize_int8

    if not int8_supported():
        pytest.skip("this PyTorch build has no fbgemm int8 kernels")
    int8 = quantize_int8(copy.deepcopy(peaked))
    with Scheduler(int8) as scheduler:
        stream = scheduler.generate([464, 3290, 373], 16, SamplingParams(0.0, seed=0), probabilities=True)
        new_ids = list(stream)
    expected = plain_forward_probabilities(int8, [464, 3290, 373], new_ids)
    assert_probabilities_match(stream.probabilities, expected, 0.02)
    assert max(record.p for record in stream.probabilities) > 0.1


def test_stream_completion_carries_the_probabilities_only_when_asked(tiny, scheduler):
    *_, (_, with_view) = stream_completion(scheduler, request(tiny), probabilities=True)
    *_, (_, without) = stream_completion(scheduler, request(tiny))
    assert len(with_view.probabilities) == with_view.new_tokens == 10 and without.probabilities == []
