"""The page's prior panel and "compare without the prior", in a real headless Chromium (issue 21)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from browser import chromium_page  # noqa: E402,F401
from live import LiveServer  # noqa: E402

from clinicalblip.data.manifest import read_manifest  # noqa: E402
from clinicalblip.metrics.labeler import label_report  # noqa: E402


@pytest.fixture(scope="module")
def live(trained_release):
    import torch

    from clinicalblip.serve import load_service
    from clinicalblip.serve.app import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    service = load_service(str(trained_release), in_process=True)
    with LiveServer(create_app(service)) as srv:
        yield srv
    torch.set_num_threads(threads)


def _pair(synth_manifest):
    for r in read_manifest(synth_manifest):
        if isinstance(r.get("prior"), dict) and len(r["images"]) == 2:
            return r
    pytest.skip("no study with a prior in the session's synthetic data")


def test_page_sends_the_prior_and_compares_without_it(live, chromium_page, synth_manifest):
    page = chromium_page
    rec = _pair(synth_manifest)
    page.goto(live.url + "/")
    page.locator("#template option").first.wait_for(state="attached")
    assert "images and report" in page.inner_text("#prior-takes")
    page.set_input_files("#frontal-input", rec["images"][0]["path"])
    page.set_input_files("#prior-input", rec["prior"]["images"][0]["path"])
    page.locator("#frontal-preview").wait_for(state="visible")
    page.locator("#prior-preview").wait_for(state="visible")
    page.fill("#prior_report", rec["prior"]["findings"])
    page.fill("#prior_date", "2020-01-01")
    page.fill("#study_date", "2020-03-01")
    page.click("#generate")
    page.locator("#result").wait_for(state="visible", timeout=60000)
    prov = page.text_content("#provenance")
    assert '"prior": "both"' in prov and "prior PA" in prov and "(60 days earlier)" in prov

    page.click("#compare-prior-button")
    page.locator("#compare").wait_for(state="visible", timeout=60000)
    assert page.inner_text("#compare-with-head") == "With the prior"
    assert page.inner_text("#compare-without-head") == "Without the prior"
    with_p, without = page.inner_text("#report-with"), page.inner_text("#report-without")
    a, b = label_report(with_p), label_report(without)
    differing = {o for o in a if a[o] != b[o]}
    highlighted = {x.get_attribute("data-observation") for x in page.locator("#compare .badge.diff").all()}
    assert highlighted == differing
    assert ("change with the prior" in page.inner_text("#compare-summary")) == bool(differing)
    # change words in the reports are marked
    marks = page.locator("#report-with mark.change").all_inner_texts()
    import re

    assert len(marks) == len(re.findall(r"\b(new|newly|increas\w*|decreas\w*|worse\w*|worsen\w*|improv\w*|unchanged|"
                                        r"stable|resol\w*|interval|prior|previous\w*|again|persist\w*)\b", with_p, re.I))
