"""The app in a real browser: Debian's Chromium driven by Playwright, as a visitor uses the page.

Run as a script, it takes the screenshots in assets/: python tests/test_browser.py [--model assets]."""

import argparse
import re
import sys
from pathlib import Path

import pytest
from app_server import ROOT, running_app

from model import GPT, generate, load_tokenizer, stream_text

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def page(tiny_folder):
    from playwright.sync_api import sync_playwright

    with running_app("--model", str(tiny_folder), "--dtype", "float32", "--quantize", "none") as app:
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


def test_an_example_fills_the_prompt_and_runs_and_clear_empties_the_page(page):
    from playwright.sync_api import expect

    page.locator("#clear").click()
    page.get_by_role("button", name="To be or not").click()
    expect(page.locator("#prompt textarea")).to_have_value("To be or not")
    expect(page.locator("#stats")).to_contain_text("tokens/s")  # the run's figures: it has ended
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
