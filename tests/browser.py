"""Headless Chromium for browser tests: the ``chromium_page`` fixture.

Debian's ``chromium`` (``/usr/bin/chromium``, or ``$CLINICALBLIP_CHROMIUM``; ``scripts/install-browser.sh`` installs
it) driven by Playwright for Python (``pip install playwright``, in the dev extra; Playwright's own browser download
is never used). Without either, or when the browser does not start, the test is skipped with the reason.

Use it from a test module with ``from browser import chromium_page  # noqa: F401`` and a ``chromium_page``
argument. The page has ``page.js_errors``: the uncaught JavaScript errors seen so far (assert it is empty).
Servers a test starts for the page must bind to 127.0.0.1 only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CLINICALBLIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def chromium_page():
    """A fresh Playwright page (1280x900) in headless Debian Chromium; skips cleanly when there is none."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install-browser.sh installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the dev extra)")
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as exc:  # a broken install or a sandbox problem: not this test's failure
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {str(exc).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.js_errors = []
            page.on("pageerror", lambda err: page.js_errors.append(str(err)))
            yield page
        finally:
            browser.close()
