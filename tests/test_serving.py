"""serve/completions.py and serve/model_facts.py: request checks, the streamed completion and its figures,
the model's facts."""

import math

import pytest
import torch

from model import GPT, GPTConfig, SamplingParams, generate, load_tokenizer, render_model_card, stream_text
from serve import ModelFacts, RequestError, Scheduler, check_request, model_facts, stream_completion

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
    arguments = dict(prompt="ROMEO:", max_new_tokens=10, temperature=0.8, top_k=50, top_p=1.0, seed=1) | changes
    return check_request(model, **arguments)


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
    [("max_new_tokens", math.nan), ("temperature", math.inf), ("top_p", -math.inf), ("top_k", None), ("seed", 10**400)],
)
def test_non_finite_huge_and_missing_numbers_are_refused(tiny, name, value):
    with pytest.raises(RequestError, match=f"{name} must be"):
        request(tiny, **{name: value})


def test_errors_never_echo_a_huge_value(tiny):
    with pytest.raises(RequestError) as error:
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
    """All streams together update at most 40 times a second: with 400 requests running one stream shows
    only the prompt, its first token (at once) and the end; alone it updates every 25 ms (steps of 10 ms)."""
    slow_steps(0.01)
    checked = request(tiny, max_new_tokens=15, temperature=0)
    monkeypatch.setattr(Scheduler, "running", property(lambda self: 400))
    busy = [stats.new_tokens for _, stats in stream_completion(scheduler, checked, update_seconds=0.001)]
    assert busy == [0, 1, 15]
    monkeypatch.setattr(Scheduler, "running", property(lambda self: 1))
    alone = [stats.new_tokens for _, stats in stream_completion(scheduler, checked, update_seconds=0.001)]
    assert 4 <= len(alone) <= 10  # ~150 ms of tokens, an update every 25 ms


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
