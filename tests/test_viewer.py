"""The HTML case viewer: `eval --html` and `view` build one offline page whose embedded data, thumbnails (PNG and
DICOM through the project's loader) and badges are right, and which works in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import chromium_page  # noqa: F401  (the fixture)
from clinicalblip import cli
from clinicalblip.data.images import load_image
from clinicalblip.data.manifest import read_manifest, write_manifest
from clinicalblip.data.synth import FINDINGS, label_report
from clinicalblip.viewer import thumbnail_data_uri
from conftest import dx_dataset

REPO = Path(__file__).resolve().parents[1]


def _write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    pydicom = pytest.importorskip("pydicom")
    dx_dataset(arr, 12, photometric).save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).PhotometricInterpretation == photometric
    return path


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to JPEG loss (mean error a few grey levels, correlation ~1); an unrelated image is far off."""
    return a.shape == b.shape and np.abs(a - b).mean() < 8 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97


def _gray(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"), dtype=float)


@pytest.fixture(scope="module")
def viewer_inputs(tmp_path_factory, synth_manifest):
    """40 synthetic studies (study 0's frontal view as a 12-bit DICOM), predictions = the next study's findings
    (so there are agreements, false positives and false negatives), and the expected labels."""
    out = tmp_path_factory.mktemp("viewer")
    recs = read_manifest(synth_manifest, resolve_paths=True)
    png = np.asarray(Image.open(recs[0]["images"][0]["path"]).convert("L"), dtype=np.uint16)
    recs[0]["images"][0]["path"] = str(_write_dicom(out / "study0_frontal.dcm", png * 16))
    manifest = out / "manifest.jsonl"
    write_manifest(recs, manifest)
    rows = []
    for i, r in enumerate(recs):
        pred = recs[(i + 1) % len(recs)]["findings"]
        if i == 2:
            pred += " </script><b>not markup</b>"  # must stay text: escaped in the page, inert in the badges
        rows.append({"id": r["id"], "prediction": pred, "reference": r["findings"], "dataset": "synthetic",
                     "labels": r["labels"]})
    preds = out / "preds.jsonl"
    preds.write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    expected = {f: {"fn": set(), "fp": set(), "agree": set()} for f in FINDINGS}
    for x in rows:
        got = label_report(x["prediction"])
        for f in FINDINGS:
            truth, said = bool(x["labels"].get(f)), bool(got[f])
            if truth and said:
                expected[f]["agree"].add(x["id"])
            elif truth:
                expected[f]["fn"].add(x["id"])
            elif said:
                expected[f]["fp"].add(x["id"])
    return {"dir": out, "manifest": manifest, "preds": preds, "rows": rows, "records": recs, "expected": expected}


def _page_data(html: Path) -> dict:
    text = html.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def report_html(viewer_inputs) -> Path:
    d = viewer_inputs["dir"]
    assert cli.main(["eval", str(viewer_inputs["preds"]), "--out", str(d / "metrics.json"), "--html",
                     str(d / "report.html"), "--manifest", str(viewer_inputs["manifest"]), "--skip-java-metrics",
                     "--bootstrap", "100", "--no-report"]) == 0
    return d / "report.html"


def test_eval_html_embeds_cases_thumbnails_and_badges(viewer_inputs, report_html):
    text = report_html.read_text(encoding="utf-8")
    assert "<script src=" not in text and "http://" not in text and "https://" not in text  # nothing to fetch
    assert "</script><b>not markup" not in text  # the prediction's "</script>" cannot end the data element
    data = _page_data(report_html)
    rows, recs = viewer_inputs["rows"], viewer_inputs["records"]
    assert data["n"] == len(rows) == 40 and [c["id"] for c in data["cases"]] == [r["id"] for r in rows]
    assert data["cases"][2]["pred"] == rows[2]["prediction"]  # the text survives intact
    assert data["observations"] == list(FINDINGS)
    # every view of every study has a thumbnail, in manifest order, with its view name
    assert len(data["thumbs"]) == sum(len(r["images"]) for r in recs)
    assert [v[1] for v in data["cases"][0]["views"]] == [im["view"] for im in recs[0]["images"]]
    # the context comes from the manifest
    assert data["cases"][5]["ctx"][0] == (recs[5]["indication"] or "")
    # badges: exactly the agree / FP / FN sets the labels give
    exp = viewer_inputs["expected"]
    for status in ("agree", "fp", "fn"):
        for j, f in enumerate(FINDINGS):
            got = {c["id"] for c in data["cases"] if [j, status, 0] in c["badges"]}
            assert got == exp[f][status], (f, status)
    # per-case scores: ROUGE-L from pycocoevalcap's per-case values; disagreements = FP + FN
    metrics = json.loads((viewer_inputs["dir"] / "metrics.json").read_text())
    assert np.mean([c["s"]["rouge"] for c in data["cases"]]) == pytest.approx(metrics["ROUGE_L"], abs=1e-4)
    dis = {c["id"]: c["s"]["dis"] for c in data["cases"]}
    assert sum(dis.values()) == sum(len(exp[f]["fp"]) + len(exp[f]["fn"]) for f in FINDINGS)
    # summary: metrics with their CIs (NLG bootstrap included) and the per-label chart data
    by_name = {r["name"]: r for r in data["rows"]}
    assert by_name["BLEU_4"]["value"] == metrics["BLEU_4"] and by_name["BLEU_4"]["ci"] == metrics["nlg_ci95"]["BLEU_4"]
    assert by_name["BLEU_4"]["ci"][0] < metrics["BLEU_4"] < by_name["BLEU_4"]["ci"][1]
    assert [b["name"] for b in data["per_label"]] == list(FINDINGS)


def test_dicom_thumbnail_goes_through_the_project_pipeline(viewer_inputs, report_html, tmp_path):
    dcm = viewer_inputs["records"][0]["images"][0]["path"]
    assert dcm.endswith(".dcm")
    want = np.asarray(load_image(dcm).convert("L"), dtype=float)
    thumb = _gray(thumbnail_data_uri(dcm, 160))
    assert want.shape == (64, 64) and _close(thumb, want)
    other = np.asarray(load_image(viewer_inputs["records"][1]["images"][0]["path"]).convert("L"), dtype=float)
    assert not _close(thumb, other)
    small = _gray(thumbnail_data_uri(dcm, 32))
    assert small.shape == (32, 32)
    # MONOCHROME1 (bone dark in stored values) is inverted by the pipeline, so the thumbnail is the negative
    arr = np.asarray(Image.open(viewer_inputs["records"][1]["images"][0]["path"]).convert("L"), dtype=np.uint16)
    m2 = _gray(thumbnail_data_uri(_write_dicom(tmp_path / "m2.dcm", arr * 16), 160))
    m1 = _gray(thumbnail_data_uri(_write_dicom(tmp_path / "m1.dcm", arr * 16, "MONOCHROME1"), 160))
    assert _close(m1, 255 - m2) and not _close(m1, m2)
    # and the page embeds exactly that rendering for study 0's first view
    data = _page_data(report_html)
    assert _close(_gray(data["thumbs"][data["cases"][0]["views"][0][0]]), want)


def test_view_with_metrics_and_ablation_rows(viewer_inputs, report_html, tmp_path, capsys):
    d = viewer_inputs["dir"]
    metrics = json.loads((d / "metrics.json").read_text())
    # eval.sh's layout: metrics_<mode>.json for the ablations and compare.json beside them
    ab = tmp_path / "eval"
    ab.mkdir()
    (ab / "metrics_real.json").write_text(json.dumps(metrics))
    worse = dict(metrics, clinical_macro_f1=metrics["clinical_macro_f1"] - 0.1)
    (ab / "metrics_none.json").write_text(json.dumps(worse))
    test = {"diff": -0.1, "ci95": [-0.2, 0.01], "p": 0.06, "p_holm": 0.06, "significant": False}
    (ab / "compare.json").write_text(json.dumps({"comparisons": [{"a": "real", "b": "none",
                                                                  "metrics": {"clinical_macro_f1": test}}]}))
    out = tmp_path / "view.html"
    assert cli.main(["view", str(viewer_inputs["preds"]), "--out", str(out), "--metrics", str(ab / "metrics_real.json"),
                     "--manifest", str(viewer_inputs["manifest"]), "--no-thumbnails"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    data = _page_data(out)
    before = _page_data(report_html)
    assert data["thumbs"] == [] and [c["badges"] for c in data["cases"]] == [c["badges"] for c in before["cases"]]
    assert data["rows"] == before["rows"]  # the summary is the given metrics.json
    assert [r["mode"] for r in data["ablations"]] == ["real", "none"]
    assert data["ablations"][1]["tests"]["clinical_macro_f1"]["significant"] is False
    # metrics of another file are refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(metrics, n=3)))
    assert cli.main(["view", str(viewer_inputs["preds"]), "--out", str(out), "--metrics", str(other)]) == 2


def test_viewer_in_headless_chromium(viewer_inputs, report_html, chromium_page, tmp_path):
    page = chromium_page
    page.goto(report_html.resolve().as_uri())
    page.wait_for_selector(".case")
    n = len(viewer_inputs["rows"])
    assert int(page.text_content("#case-count")) == n and int(page.text_content("#case-total")) == n
    page.select_option("#f-size", "200")
    # one label's false negatives: exactly the studies the labels say
    exp = viewer_inputs["expected"]
    label = max(FINDINGS, key=lambda f: len(exp[f]["fn"]))
    assert exp[label]["fn"]
    page.select_option("#f-label", str(FINDINGS.index(label)))
    page.select_option("#f-err", "fn")
    shown = set(page.eval_on_selector_all(".case", "els => els.map(e => e.dataset.id)"))
    assert shown == exp[label]["fn"]
    assert int(page.text_content("#case-count")) == len(exp[label]["fn"])
    page.select_option("#f-err", "fp")
    assert set(page.eval_on_selector_all(".case", "els => els.map(e => e.dataset.id)")) == exp[label]["fp"]
    # text search narrows to the studies whose text contains it
    page.click("#f-clear")
    page.fill("#f-q", "pneumothorax")
    page.wait_for_function("document.querySelector('#case-count').textContent != '%d'" % n)
    want = {r["id"] for r in viewer_inputs["rows"]
            if "pneumothorax" in (r["prediction"] + r["reference"]).lower()
            or any("pneumothorax" in (m.get(k) or "").lower() for m in viewer_inputs["records"] if m["id"] == r["id"]
                   for k in ("indication", "history", "comparison"))}
    assert set(page.eval_on_selector_all(".case", "els => els.map(e => e.dataset.id)")) == want
    # a study opened by its link (#case=ID, as compare.html links): its DICOM-rendered thumbnail has loaded
    page.click("#f-clear")
    first = viewer_inputs["rows"][0]["id"]
    page.goto(report_html.resolve().as_uri() + f"#case={first}")
    page.wait_for_selector(f'.case.focus[data-id="{first}"] img.thumb')
    page.wait_for_function("Array.from(document.querySelectorAll('.case.focus img.thumb')).every(i => i.complete)")
    widths = page.eval_on_selector_all(".case.focus img.thumb", "els => els.map(e => e.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    page.click("#f-clear")  # lazy loading: the thumbnails in view have loaded, at their embedded size
    page.wait_for_function("document.querySelector('img.thumb').complete")
    assert page.eval_on_selector("img.thumb", "e => e.naturalWidth") == 64
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert page.js_errors == []


def test_view_scores_real_reports_with_uncertain_badges(tmp_path):
    rows = [
        {"id": "r/1", "reference": "Right lower lobe consolidation, possibly pneumonia.",
         "prediction": "Cannot exclude pneumonia. Small left pleural effusion."},
        {"id": "r2", "reference": "Small left pleural effusion.", "prediction": "No pleural effusion."},
        {"id": "r3", "reference": "The lungs are clear.", "prediction": "The lungs are clear."},
    ]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "v.html"
    assert cli.main(["view", str(preds), "--out", str(out), "--skip-java-metrics", "--bootstrap", "50"]) == 0
    data = _page_data(out)
    obs = data["observations"]
    assert data["labeler"] == "chexpert-rules" and len(obs) == 14 and data["manifest"] is None
    by_id = {c["id"]: c for c in data["cases"]}
    assert [obs.index("Pneumonia"), "agree", 1] in by_id["r/1"]["badges"]  # uncertain on both sides
    assert [obs.index("Pleural Effusion"), "fp", 0] in by_id["r/1"]["badges"]
    # "No pleural effusion." also says No Finding, which the reference does not: two disagreements
    assert by_id["r2"]["badges"] == [[obs.index("No Finding"), "fp", 0], [obs.index("Pleural Effusion"), "fn", 0]]
    assert by_id["r2"]["s"]["dis"] == 2
    assert by_id["r3"]["s"]["dis"] == 0 and by_id["r3"]["views"] == [] and data["thumbs"] == []
    assert by_id["r3"]["s"]["rouge"] == 1.0
