"""The app in a real browser: Debian's Chromium driven by Playwright, as a visitor uses the page.

Run as a script, it takes the screenshot in assets/: python tests/test_browser.py [--model assets]."""

import argparse
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


def test_examples_fill_the_prompt_and_clear_empties_the_page(page):
    from playwright.sync_api import expect

    page.get_by_role("button", name="To be or not").click()
    expect(page.locator("#prompt textarea")).to_have_value("To be or not")
    page.locator("#clear").click()
    expect(page.locator("#prompt textarea")).to_have_value("")
    expect(page.locator("#output textarea")).to_have_value("")


def take_screenshot(model: str, path: Path, prompt: str = "ROMEO:", max_new_tokens: int = 120) -> None:
    """Generate from prompt with a fixed seed in the running app and save the whole page."""
    from playwright.sync_api import expect, sync_playwright

    with running_app("--model", model) as app, sync_playwright() as playwright:
        url = app.url
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#prompt textarea").fill(prompt)
        tokens = page.get_by_label("number input for Max new tokens")
        tokens.fill(str(max_new_tokens))
        tokens.press("Enter")
        page.locator("#seed input").fill("42")
        page.locator("#generate").click()
        expect(page.locator("#stats")).to_contain_text("tokens/s")
        page.screenshot(path=str(path), full_page=True)
        browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save a screenshot of the running app.")
    parser.add_argument("--model", default=str(ROOT / "assets"))
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    args = parser.parse_args()
    take_screenshot(args.model, args.out)
    print(f"saved {args.out}", file=sys.stderr)
