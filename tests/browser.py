"""Headless Chromium for browser tests: Debian's `chromium` driven by Playwright for Python.

    from browser import chromium_page  # noqa: F401  (a pytest fixture)

    def test_page(chromium_page):
        chromium_page.goto(url)

`chromium_page` is a fresh page in its own browser, closed after the test (self-contained: importing the one
name is enough). The test skips,
saying why, when Playwright is not installed or the chromium binary is missing or cannot start. Playwright's own
browser download is never used (no network): CHROMIUM (default /usr/bin/chromium) names the binary.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """The chromium binary to drive, or None."""
    if os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium")


@pytest.fixture
def chromium_page():
    """A fresh headless Chromium page (its own browser process; about a second to start), closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test skipped: Playwright for Python is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"browser test skipped: no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
    except Exception as exc:  # a broken install: say so and skip rather than fail the suite
        pw.stop()
        pytest.skip(f"browser test skipped: chromium at {exe} did not start: {str(exc).splitlines()[0]}")
    try:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        yield context.new_page()
        context.close()
    finally:
        browser.close()
        pw.stop()
