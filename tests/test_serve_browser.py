"""The page at / in a real headless Chromium: upload frontal + lateral, type an indication, generate."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from browser import chromium_page  # noqa: E402,F401
from live import LiveServer  # noqa: E402

from clinicalblip.data.manifest import read_manifest  # noqa: E402
from clinicalblip.metrics.labeler import label_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "serve_page.png"


@pytest.fixture(scope="module")
def live(trained_release):
    import torch

    from clinicalblip.serve import load_service
    from clinicalblip.serve.app import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/conftest.py trained_release
    service = load_service(str(trained_release), threads=1)  # as `serve` runs it: the model in a worker process
    try:
        with LiveServer(create_app(service)) as srv:
            yield srv
    finally:
        service.close()
        torch.set_num_threads(threads)


def _study(synth_manifest):
    return next(r for r in read_manifest(synth_manifest) if len(r["images"]) == 2 and r["indication"])


def test_page_generates_a_report_with_findings(live, chromium_page, synth_manifest, tmp_path):
    page = chromium_page
    rec = _study(synth_manifest)
    page.goto(live.url + "/")
    page.locator("#template option").first.wait_for(state="attached")
    assert "Not a medical device" in page.inner_text("#about-text")
    page.set_input_files("#frontal-input", rec["images"][0]["path"])
    page.set_input_files("#lateral-input", rec["images"][1]["path"])
    # Previews come back from /v1/preview as PNG blobs. (Locator waits, not wait_for_function: the page's CSP
    # forbids eval, which Playwright's string predicates need.)
    page.locator("#frontal-preview").wait_for(state="visible")
    page.locator("#lateral-preview").wait_for(state="visible")
    page.fill("#indication", rec["indication"])
    page.click("#generate")
    page.locator("#result").wait_for(state="visible", timeout=60000)
    report = page.inner_text("#report").strip()
    assert report, "no report text on the page"
    labels = label_report(report)
    named = [o for o, v in labels.items() if v is not None and o != "No Finding"]
    assert named, f"the report names no finding: {report!r}"
    badges = page.locator("#findings .badge").all_inner_texts()
    for obs in named:
        assert any(b.startswith(obs) for b in badges), (obs, badges)
    assert "generation" in page.inner_text("#timings")
    assert "findings_with_context" in page.text_content("#provenance")
    assert rec["indication"].split()[0] in page.text_content("#provenance")  # the prompt carried the indication
    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CLINICALBLIP_UPDATE_SCREENSHOT"):  # refresh the README's screenshot (docs/)
        _save_small(shot, SCREENSHOT)


def test_page_compares_with_and_without_the_indication(live, chromium_page, synth_manifest):
    page = chromium_page
    rec = _study(synth_manifest)
    page.goto(live.url + "/")
    page.locator("#template option").first.wait_for(state="attached")
    page.set_input_files("#frontal-input", rec["images"][0]["path"])
    page.locator("#frontal-preview").wait_for(state="visible")
    page.fill("#indication", rec["indication"])
    page.click("#compare-button")
    page.locator("#compare").wait_for(state="visible", timeout=60000)
    with_ind, without = page.inner_text("#report-with"), page.inner_text("#report-without")
    a, b = label_report(with_ind), label_report(without)
    differing = {o for o in a if a[o] != b[o]}
    highlighted = {b.get_attribute("data-observation") for b in page.locator("#compare .badge.diff").all()}
    assert highlighted == differing
    summary = page.inner_text("#compare-summary")
    assert ("change with the indication" in summary) == bool(differing)


def test_page_shows_a_clear_error_for_a_bad_file(live, chromium_page, synth_manifest, tmp_path):
    page = chromium_page
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not a picture at all" * 10)
    page.goto(live.url + "/")
    good = next(r for r in read_manifest(synth_manifest) if r["images"])["images"][0]["path"]
    page.set_input_files("#frontal-input", good)
    page.locator("#frontal-preview").wait_for(state="visible")
    page.set_input_files("#frontal-input", str(bad))  # replaces a good image: its preview must go too
    page.locator("#error").wait_for(state="visible")
    text = page.inner_text("#error")
    assert text.startswith("frontal image: cannot decode image: not a PNG, JPEG, DICOM"), text
    assert text.count("cannot decode") == 1 and "images" not in text, text  # said once
    page.locator("#frontal-preview").wait_for(state="hidden")
    assert page.locator("#frontal-preview").get_attribute("src") is None
    assert page.locator("#frontal-hint").is_visible() and page.locator("#frontal-clear").is_hidden()


def _save_small(src: Path, dst: Path) -> None:
    """A palette PNG of the screenshot: a few tens of kB in the repository instead of hundreds."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    dst.write_bytes(buf.getvalue())
