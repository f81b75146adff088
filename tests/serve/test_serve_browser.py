"""The playground in headless Chromium: type a prompt, press Generate, watch the text stream in
with every token coloured by its probability; chat in the chat tab."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from conftest import serving

from pilelm.tokens.tokenizer import load_tokenizer

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make browser` installs it)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (make browser)"),
]


@pytest.fixture(scope="module")
def playground_url(chat_template_run: Path):
    # A chat template that passes the user's words through: the chat tab's reply is the fitted
    # model reciting its text.
    with serving(chat_template_run, model_name="tiny") as s:
        yield s.url


@contextlib.contextmanager
def open_page(url: str):
    """A headless Chromium page at ``url``; yields (page, JavaScript errors seen)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()


def test_playground_streams_a_completion_coloured_by_probability(playground_url: str, tiny_run: Path,
                                                                 tmp_path: Path):
    from playwright.sync_api import expect

    with open_page(playground_url) as (page, errors):
        expect(page.locator("#model")).to_contain_text("tiny")
        page.locator("#temperature").fill("0")  # greedy: the fitted model recites its text
        page.locator("#max_tokens").fill("40")
        page.locator("#prompt").fill("the quick")
        page.locator("#generate").click()
        output = page.locator("#output")
        expect(output).to_have_attribute("data-state", "done", timeout=30_000)
        assert page.locator("#output .prompt-echo").inner_text() == "the quick"
        completion = page.locator("#output .completion").inner_text()
        assert completion.startswith(" brown fox jumps over the lazy dog")
        assert int(output.get_attribute("data-chunks")) > 3  # arrived in pieces, not at once
        # Every token is a span coloured by its probability, the echoed prompt's too (its
        # first token has no context); hovering one shows the value.
        prompt_tokens = page.locator("#output .prompt-echo .tok")
        n_prompt = len(load_tokenizer(tiny_run / "tokenizer").encode("the quick"))
        assert prompt_tokens.count() == n_prompt and prompt_tokens.first.get_attribute("data-p") is None
        assert 0 < float(prompt_tokens.nth(1).get_attribute("data-p")) <= 1
        tokens = page.locator("#output .completion .tok")
        assert tokens.count() >= 8
        probs = [float(tokens.nth(i).get_attribute("data-p")) for i in range(tokens.count())]
        assert all(0 < p <= 1 for p in probs) and max(probs) > 0.5  # the fitted text is likely
        assert "background-color" in tokens.first.get_attribute("style")
        tokens.nth(1).hover()
        expect(page.locator("#token_info")).to_contain_text("p = ")
        assert page.locator("#token_info").inner_text() == tokens.nth(1).get_attribute("title")
        stats = page.locator("#stats").inner_text()
        assert "tok/s" in stats and "tokens" in stats, stats
        assert page.locator("#error").is_hidden()
        assert not errors, errors
        shot = Path(os.environ.get("PILELM_SCREENSHOT", tmp_path / "playground.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def test_playground_chat_tab_streams_replies(playground_url: str, tmp_path: Path):
    from playwright.sync_api import expect

    with open_page(playground_url) as (page, errors):
        expect(page.locator("#model")).to_contain_text("tiny")
        page.locator("#tab_chat").click()
        assert page.locator("#panel_complete").is_hidden() and page.locator("#panel_chat").is_visible()
        page.locator("#temperature").fill("0")
        page.locator("#max_tokens").fill("40")
        log = page.locator("#chat_log")
        page.locator("#chat_input").fill("the quick")
        page.locator("#chat_send").click()
        expect(log).to_have_attribute("data-turns", "1", timeout=30_000)
        expect(log).to_have_attribute("data-state", "done")
        assert page.locator("#chat_log .msg.user .text").inner_text() == "the quick"
        reply = page.locator("#chat_log .msg.assistant .text").first
        assert reply.inner_text().startswith(" brown fox jumps over the lazy dog")
        spans = page.locator("#chat_log .msg.assistant .tok")
        assert spans.count() >= 8 and all(0 < float(spans.nth(i).get_attribute("data-p")) <= 1
                                          for i in range(spans.count()))
        assert "tok/s" in page.locator("#chat_stats").inner_text()
        # A second turn sends the whole conversation.
        page.locator("#chat_input").fill(" pack my")
        page.locator("#chat_send").click()
        expect(log).to_have_attribute("data-turns", "2", timeout=30_000)
        assert page.locator("#chat_log .msg").count() == 4
        assert page.locator("#error").is_hidden()
        assert not errors, errors
        shot = Path(os.environ.get("PILELM_CHAT_SCREENSHOT", tmp_path / "chat.png"))
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        page.locator("#chat_clear").click()
        assert page.locator("#chat_log .msg").count() == 0
