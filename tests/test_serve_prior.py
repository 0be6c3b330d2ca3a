"""The prior study through the server: form fields, the prompt, refusals naming the setting (issue 21)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from clinicalblip.data.manifest import read_manifest  # noqa: E402
from clinicalblip.serve import load_service  # noqa: E402
from clinicalblip.serve.app import create_app  # noqa: E402
from clinicalblip.serve.engine import ReportService, ServeSettings  # noqa: E402


@pytest.fixture(scope="module")
def service(trained_release):
    import torch

    torch.set_num_threads(1)
    return load_service(str(trained_release), in_process=True)


@pytest.fixture(scope="module")
def pair(synth_manifest):
    """A study with a prior (both with two views)."""
    recs = read_manifest(synth_manifest)
    for r in recs:
        if isinstance(r.get("prior"), dict) and len(r["images"]) == 2:
            return r
    pytest.skip("no study with a prior in the session's synthetic data")


def _files(rec, prior=True):
    files = [("images", (f"v{i}.png", open(im["path"], "rb").read(), "image/png")) for i, im in enumerate(rec["images"])]
    if prior:
        files.append(("prior_images", ("old.png", open(rec["prior"]["images"][0]["path"], "rb").read(), "image/png")))
    return files


def test_a_prior_in_the_form_reaches_the_prompt_and_matches_the_library(service, pair):
    with TestClient(create_app(service.with_settings(ServeSettings(max_wait_ms=5)))) as c:
        data = {"views": ["PA", "LATERAL"], "indication": pair["indication"] or "", "max_new_tokens": "12",
                "prior_report": pair["prior"]["findings"], "prior_date": "2020-01-01", "study_date": "2020-02-15"}
        r = c.post("/v1/reports", files=_files(pair), data=data)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["prior"] == "both"
        assert "Views: PA, LATERAL, prior PA" in out["prompt"]
        assert "Prior report: (45 days earlier) " + " ".join(pair["prior"]["findings"].split()) in out["prompt"]
        ref = service.rm.report([im["path"] for im in pair["images"]], indication=pair["indication"] or None,
                                views=["PA", "LATERAL"], max_new_tokens=12,
                                prior={"images": [pair["prior"]["images"][0]["path"]], "report": pair["prior"]["findings"],
                                       "study_date": "2020-01-01", "interval_days": 45})
        assert out["report"] == ref["report"] and out["prompt"] == ref["prompt"]
        # "compare without the prior": the same study without the prior fields
        r2 = c.post("/v1/reports", files=_files(pair, prior=False), data={"views": ["PA", "LATERAL"],
                                                                          "max_new_tokens": "12"})
        assert r2.status_code == 200 and r2.json()["prior"] is None and "prior" not in r2.json()["prompt"].lower()
        m = c.get("/v1/model").json()
        assert m["prior"] == {"takes": "both", "max_prior_views": 1}
        # bad prior input: 422 naming the field
        bad = c.post("/v1/reports", files=_files(pair), data={"prior_date": "last week"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "prior_date"
        late = c.post("/v1/reports", files=_files(pair), data={"prior_date": "2021-01-01", "study_date": "2020-01-01"})
        assert late.status_code == 422 and late.json()["error"]["field"] == "prior_date"
        alone = c.post("/v1/reports", files=_files(pair, prior=False), data={"prior_date": "2021-01-01"})
        assert alone.status_code == 422 and alone.json()["error"]["field"] == "prior_date"


def test_a_model_without_priors_refuses_them_naming_the_setting(service, pair):
    no_prior = ReportService(dataclasses.replace(service.rm, prior="none"), ServeSettings(max_wait_ms=5))
    with TestClient(create_app(no_prior)) as c:
        r = c.post("/v1/reports", files=_files(pair), data={"max_new_tokens": "4"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["field"] == "prior_images" and "data.prior=none" in err["message"]
        r = c.post("/v1/reports", files=_files(pair, prior=False), data={"prior_report": "Stable.",
                                                                         "max_new_tokens": "4"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "prior_report"
        assert c.post("/v1/reports", files=_files(pair, prior=False), data={"max_new_tokens": "4"}).status_code == 200
