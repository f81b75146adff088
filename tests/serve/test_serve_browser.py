"""The playground in headless Chromium: type a prompt, press Generate, watch the text stream in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine

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
def playground_url(tiny_run: Path):
    cfg = ServeConfig(run=str(tiny_run), model_name="tiny")
    engine = load_engine(cfg)
    engine.start()
    with BackgroundServer(create_app(engine, cfg)) as srv:
        yield srv.url
    engine.stop()


def test_playground_streams_a_completion(playground_url: str, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(playground_url)
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
            stats = page.locator("#stats").inner_text()
            assert "tok/s" in stats and "tokens" in stats, stats
            assert page.locator("#error").is_hidden()
            assert not errors, errors
            shot = Path(os.environ.get("PILELM_SCREENSHOT", tmp_path / "playground.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
