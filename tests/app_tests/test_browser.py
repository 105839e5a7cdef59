"""The app in a real browser: Debian's Chromium driven by Playwright, as a visitor uses the page.

Run as a script, it takes the screenshots in assets/: python tests/app_tests/test_browser.py [--model assets]."""

import argparse
import contextlib
import re
import shutil
import sys
from pathlib import Path

import pytest
from app_server import ROOT, running_app

from model import GPT, generate, load_tokenizer, render_model_card, stream_text
from model.card import CARD_NAME

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def served(tiny_folder, tmp_path_factory):
    """tiny_folder's model with the card of a fine-tune, like the shipped model's: its `steps` count both runs,
    its `init` records the run it started from, its loss curve draws the fine-tune's steps alone."""
    folder = tmp_path_factory.mktemp("fine-tuned")
    shutil.copytree(tiny_folder, folder, dirs_exist_ok=True)
    init = "a base run (1,000 steps of --preset tiny, held-out 4.9876)"
    metrics = {"train_loss": 1.2345, "val_loss": 4.5678, "steps": 1060, "init": init}
    (folder / CARD_NAME).write_text(render_model_card(GPT.from_pretrained(folder).config, metrics))
    return folder


@pytest.fixture(scope="module")
def hold(tmp_path_factory):
    """The app's environment and the file that holds its decoding while it exists (test_public's held_decoding):
    a run started then has shown its first token and streams on when the file goes, however fast the machine."""
    from app_server import held_decoding

    return held_decoding(tmp_path_factory.mktemp("held"))


@contextlib.contextmanager
def held(hold):
    _, path = hold
    path.touch()
    try:
        yield
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def page(served, hold):
    from playwright.sync_api import sync_playwright

    env, _ = hold
    with running_app("--model", str(served), "--dtype", "float32", "--quantize", "none", env=env) as app:
        url = app.url
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#prompt textarea").wait_for()
            yield page
            browser.close()


def test_the_first_click_without_typing_streams_text(page):
    """A visitor's first move: Generate on the page as it opens. The prompt is already there, so text
    streams after it; no error shows anywhere."""
    from playwright.sync_api import expect

    page.reload()
    expect(page.locator("#prompt textarea")).to_have_value("ROMEO:")
    page.locator("#generate").click()
    expect(page.locator("#stats")).to_contain_text("tokens/s")  # the run's figures: it has ended
    assert page.locator("#output textarea").input_value().startswith("ROMEO:")
    assert len(page.locator("#output textarea").input_value()) > len("ROMEO:")
    expect(page.get_by_text("Error")).to_have_count(0)


def test_type_a_prompt_move_a_slider_generate_and_see_the_continuation(page, tiny_folder):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("ROMEO:")
    page.get_by_label("range slider for Temperature").press("Home")  # to 0: greedy, so the text is known
    max_new_tokens = page.get_by_label("number input for Max new tokens")
    max_new_tokens.fill("20")
    max_new_tokens.press("Enter")
    expect(page.get_by_label("number input for Temperature")).to_have_value("0")
    page.locator("#generate").click()

    tokenizer = load_tokenizer()
    ids = generate(GPT.from_pretrained(tiny_folder), tokenizer.encode("ROMEO:"), 20, temperature=0)
    expect(page.locator("#output textarea")).to_have_value("ROMEO:" + "".join(stream_text(ids, tokenizer)))
    expect(page.locator("#stats")).to_contain_text("20 tokens in")
    expect(page.locator("#stats")).to_contain_text("tokens/s")


def test_a_refused_request_says_why_and_keeps_the_last_continuation(page):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("ROMEO:")
    max_new_tokens = page.get_by_label("number input for Max new tokens")
    max_new_tokens.fill("10")
    max_new_tokens.press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#stats")).to_contain_text("10 tokens in")  # the run has ended
    shown = page.locator("#output textarea").input_value()
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    expect(page.get_by_text("prompt is empty")).to_be_visible()
    expect(page.locator("#output textarea")).to_have_value(shown)
    expect(page.locator("#output").get_by_text("Error")).to_have_count(0)
    expect(page.locator("#stop")).to_be_disabled()  # nothing runs
    expect(page.locator("#stats")).to_contain_text("10 tokens in")  # the figures of the text still shown


def test_an_example_fills_the_prompt_and_runs_and_clear_empties_the_page(page, hold):
    from playwright.sync_api import expect

    page.locator("#clear").click()
    with held(hold):
        page.get_by_role("button", name="To be or not").click()
        expect(page.locator("#output textarea")).to_have_value(re.compile(r"^To be or not.+", re.DOTALL))
        expect(page.locator("#stop")).to_be_enabled()  # the example's run streams: Stop is live
    expect(page.locator("#prompt textarea")).to_have_value("To be or not")
    expect(page.locator("#stats")).to_contain_text("tokens/s")  # the run's figures: it has ended
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#output textarea")).to_have_value(re.compile(r"^To be or not.+", re.DOTALL))
    page.locator("#clear").click()
    expect(page.locator("#prompt textarea")).to_have_value("")
    expect(page.locator("#output textarea")).to_have_value("")


def test_the_probability_view_colours_each_token_and_shows_alternatives(page):
    """With "Show probabilities" on, each new token is a coloured span; hovering one shows its probability
    and the 5 likeliest tokens."""
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill("ROMEO:")
    max_new_tokens = page.get_by_label("number input for Max new tokens")
    max_new_tokens.fill("12")
    max_new_tokens.press("Enter")
    page.get_by_label("Show probabilities").check()
    page.locator("#generate").click()
    expect(page.locator("#stats")).to_contain_text("12 tokens in")
    tokens = page.locator("#probabilities .token")
    expect(tokens).to_have_count(12)
    assert all("hsla(" in (tokens.nth(i).get_attribute("style") or "") for i in range(12))
    tokens.nth(0).hover()
    expect(tokens.nth(0).locator(".alternatives")).to_be_visible()
    expect(tokens.nth(0).locator(".alternatives li")).to_have_count(5)
    page.get_by_label("Show probabilities").uncheck()
    expect(page.locator("#probabilities")).to_be_hidden()


def set_new_tokens(page, count: int) -> None:
    box = page.get_by_label("number input for Max new tokens")
    box.fill(str(count))
    box.press("Enter")


def test_stop_is_live_only_while_a_run_streams_and_the_stats_wait_for_its_own_figures(page, hold):
    """Idle, Stop is disabled; a run turns it on and empties the stats line of the last run's figures
    until its own arrive; when the run ends Stop is off again. Decoding is held after the new run's first token,
    so it is seen streaming on any machine."""
    from playwright.sync_api import expect

    stop, stats, output = page.locator("#stop"), page.locator("#stats"), page.locator("#output textarea")
    page.reload()
    expect(stop).to_be_disabled()
    page.locator("#prompt textarea").fill("ROMEO:")
    set_new_tokens(page, 10)
    page.locator("#generate").click()
    expect(stats).to_contain_text("10 tokens in")
    expect(stop).to_be_disabled()
    page.locator("#prompt textarea").fill("JULIET:")
    set_new_tokens(page, 14)
    with held(hold):
        page.locator("#generate").click()
        expect(output).to_have_value(re.compile(r"^JULIET:.+", re.DOTALL))  # its first token: it streams
        expect(stop).to_be_enabled()
        expect(stats).not_to_contain_text("tokens")  # not the last run's "10 tokens in ..."
        expect(stats).to_contain_text("Generating")
    expect(stats).to_contain_text("14 tokens in")
    expect(stop).to_be_disabled()


def test_stop_ends_a_streaming_run_and_goes_idle(page, hold):
    from playwright.sync_api import expect

    stop, output = page.locator("#stop"), page.locator("#output textarea")
    page.locator("#prompt textarea").fill("JULIET:")
    set_new_tokens(page, 30)
    with held(hold):
        page.locator("#generate").click()
        expect(output).to_have_value(re.compile(r"^JULIET:.+", re.DOTALL))
        stop.click()
        expect(stop).to_be_disabled()
        stopped = output.input_value()
    page.wait_for_timeout(1000)  # decoding runs again: a stopped run writes no more
    expect(output).to_have_value(stopped)
    expect(page.locator("#stats")).not_to_contain_text("Generating")


def test_the_model_panel_says_what_its_loss_curve_covers(page):
    """The card counts 1,060 steps over two runs; the curve is the fine-tune's 60 alone, and says so, with the
    run it started from among the facts."""
    from playwright.sync_api import expect

    expect(page.locator("#loss-curve")).to_contain_text("Loss curve: fine-tune steps 1,001-1,060")
    expect(page.locator("#loss-curve-note")).to_contain_text("the fine-tune's own steps, 1-60; the 1,000 before")
    expect(page.locator("#model-facts")).to_contain_text("started from: a base run (1,000 steps of --preset tiny")


SCREENS = {"desktop": dict(width=1280, height=900), "phone": dict(width=390, height=844)}


def take_screenshots(model: str, folder: Path, prompt: str = "ROMEO:", max_new_tokens: int = 80) -> list[Path]:
    """Generate from prompt with a fixed seed and the probability view open, one token's alternatives shown,
    and save the whole page at desktop and phone width (screenshot.png, screenshot-phone.png)."""
    from playwright.sync_api import expect, sync_playwright

    paths = []
    with running_app("--model", model) as app, sync_playwright() as playwright:
        browser = launch(playwright)
        for screen, viewport in SCREENS.items():
            page = browser.new_page(viewport=viewport, device_scale_factor=1)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app.url)
            page.locator("#prompt textarea").fill(prompt)
            tokens = page.get_by_label("number input for Max new tokens")
            tokens.fill(str(max_new_tokens))
            tokens.press("Enter")
            page.locator("#seed input").fill("42")
            page.get_by_label("Show probabilities").check()
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text(f"{max_new_tokens} tokens in")
            page.locator("#probabilities .token").nth(3).focus()
            paths.append(folder / ("screenshot.png" if screen == "desktop" else f"screenshot-{screen}.png"))
            page.screenshot(path=str(paths[-1]), full_page=True)
            page.close()
        browser.close()
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save screenshots of the running app, desktop and phone width.")
    parser.add_argument("--model", default=str(ROOT / "assets"))
    parser.add_argument("--out", type=Path, default=ROOT / "assets", help="the folder for the screenshots")
    args = parser.parse_args()
    for path in take_screenshots(args.model, args.out):
        print(f"saved {path}", file=sys.stderr)
