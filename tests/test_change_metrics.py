"""Change-aware metrics (issue 21): change labels on the synthetic bank and real IU X-Ray wording, temporal F1
(Libra / RadEval definition), invented comparisons, change F1, and their place in eval / compare."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from clinicalblip.metrics.change import (
    change_f1,
    change_labels,
    invented_comparison,
    temporal_f1,
    temporal_f1_one,
    temporal_keywords,
)

IU_DEV = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data" / "iu_xray_dev"
if not IU_DEV.is_dir():  # worktrees live beside the main checkout; the data is in ../shared
    IU_DEV = Path("/work/shared/data/iu_xray_dev")

# Real IU X-Ray sentences (indiana_reports_dev.csv) and the change the parser must read from them.
IU_SENTENCES = {
    "Stable calcified granuloma within the right upper lung.": {"nodule": "unchanged"},
    "Interval improvement in left base consolidative opacity.": {"consolidation": "better"},
    "Stable enlarged cardiomediastinal silhouette.": {"cardiomegaly": "unchanged"},
    "Small to moderate left-sided pleural effusion, increased XXXX compared to prior chest radiograph.":
        {"pleural_effusion": "worse"},
    "Numerous bilateral pulmonary nodules have increased in size and number XXXX compared to prior study.":
        {"nodule": "worse"},
    "There is persistent mild to moderate cardiomegaly.": {"cardiomegaly": "unchanged"},
    "Heart size is unchanged.": {"cardiomegaly": "unchanged"},
    "Pulmonary vascular congestion again noted.": {"edema": "unchanged"},
    "Interval increase in size and number of innumerable bilateral pulmonary nodules consistent with worsening "
    "metastatic disease.": {"nodule": "worse"},
    "A 5 mm stable right apical nodule.": {"nodule": "unchanged"},
    "Recommend follow up to ensure resolution.": {},
    "Mild hyperinflation appears similar to prior.": {},
}


def _iu_texts() -> str:
    rows = list(csv.DictReader(open(IU_DEV / "indiana_reports_dev.csv", encoding="utf-8")))
    return "\n".join(" ".join(f"{r.get('findings') or ''} {r.get('impression') or ''}".split()) for r in rows)


@pytest.mark.skipif(not (IU_DEV / "indiana_reports_dev.csv").is_file(), reason="no IU X-Ray dev reports in ../shared")
@pytest.mark.parametrize("sentence", list(IU_SENTENCES))
def test_change_parser_on_real_iu_sentences(sentence):
    assert " ".join(sentence.split()) in _iu_texts(), "the sentence must be real IU wording"
    assert change_labels(sentence) == IU_SENTENCES[sentence]


@pytest.mark.parametrize("text,want", [
    ("Increased left pleural effusion, now moderate.", {"pleural_effusion": "worse"}),
    ("The right pneumothorax has decreased, now small.", {"pneumothorax": "better"}),
    ("Interval resolution of the left lower lobe consolidation.", {"consolidation": "resolved"}),
    ("The previously seen right upper lung nodule has resolved.", {"nodule": "resolved"}),
    ("There is a new moderate left pneumothorax.", {"pneumothorax": "new"}),
    ("Stable moderate cardiomegaly. No pleural effusion.", {"cardiomegaly": "unchanged"}),
    ("No new consolidation. No pneumothorax.", {}),
    ("No change in the small right pleural effusion.", {"pleural_effusion": "unchanged"}),
    ("The previously seen pneumothorax is no longer seen.", {"pneumothorax": "resolved"}),
    ("There is a moderate left pleural effusion. The heart is enlarged.", {}),
])
def test_change_parser_on_the_synthetic_bank_and_negations(text, want):
    assert change_labels(text) == want


def test_temporal_f1_follows_the_libra_radeval_definition():
    assert temporal_keywords("New left effusion; the heart is enlarged, stable nodule.") == {"new", "stable"}
    assert temporal_f1_one("Heart normal.", "Lungs clear.") == 1.0  # both empty
    assert temporal_f1_one("Stable cardiomegaly.", "Cardiomegaly.") == 0.0
    assert temporal_f1_one("Lungs clear.", "Unchanged lungs.") == 0.0
    # sets, not counts: {increased, new} vs {increased, stable}: P = R = 1/2
    assert temporal_f1_one("Increased effusion. New nodule. New opacity.", "Increased effusion, stable nodule.") == 0.5
    assert temporal_f1(["Stable.", "Clear."], ["Stable.", "New."]) == 0.5  # mean over reports
    assert math.isnan(temporal_f1([], []))


def test_invented_comparison():
    assert invented_comparison("Unchanged cardiomegaly.")
    assert invented_comparison("Compared with the prior radiograph, the lungs are clear.")
    assert invented_comparison("No change in the effusion.")
    assert not invented_comparison("The heart is enlarged. No pleural effusion.")
    assert not invented_comparison("No comparison chest x-XXXX. The lungs are clear.")
    assert not invented_comparison("")


def test_change_f1_is_a_macro_over_findings():
    ref = [{"pleural_effusion": "worse"}, {"pleural_effusion": "new", "nodule": "unchanged"}, {}]
    pred = [{"pleural_effusion": "worse"}, {"pleural_effusion": "better"}, {"cardiomegaly": "new"}]
    out = change_f1(ref, pred)
    # effusion: tp 1, fp 1, fn 1 -> 0.5; nodule: fn 1 -> 0; cardiomegaly: fp 1 -> 0
    assert out["per_finding"]["pleural_effusion"]["f1"] == pytest.approx(0.5)
    assert out["change_f1"] == pytest.approx(0.5 / 3)
    assert change_f1([{}], [{}])["change_f1"] != change_f1([{}], [{}])["change_f1"]  # NaN: nothing to score


def _rows(n_with=30, n_without=20, good=True):
    rows = []
    for i in range(n_with):
        ref = "Increased left pleural effusion, now moderate." if i % 2 else "New right pneumothorax."
        pred = ref if good else ("Moderate left pleural effusion." if i % 2 else "Right pneumothorax.")
        rows.append({"id": f"w{i}", "reference": ref, "prediction": pred, "has_prior": True})
    for i in range(n_without):
        pred = "Unchanged cardiomegaly." if (not good and i < 5) else "The heart is enlarged."
        rows.append({"id": f"n{i}", "reference": "The heart is enlarged.", "prediction": pred, "has_prior": False})
    return rows


def test_eval_reports_change_metrics_and_compare_tests_them(tmp_path):
    from clinicalblip.metrics.compare import compare_files
    from clinicalblip.metrics.evaluate_predictions import evaluate_predictions

    a, b = tmp_path / "without.jsonl", tmp_path / "with.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in _rows(good=False)))
    b.write_text("\n".join(json.dumps(r) for r in _rows(good=True)))
    m = evaluate_predictions(b, tmp_path / "m.json", bootstrap=0, report_md=False, skip_java_metrics=True)
    assert m["change"]["n_with_prior"] == 30 and m["change"]["n_without_prior"] == 20
    assert m["change_f1"] == 1.0 and m["temporal_f1"] == 1.0 and m["invented_comparison_rate"] == 0.0
    m0 = evaluate_predictions(a, tmp_path / "m0.json", bootstrap=0, report_md=False, skip_java_metrics=True)
    assert m0["change_f1"] == 0.0 and m0["invented_comparison_rate"] == 0.25
    res = compare_files([a, b], tmp_path / "c.json", names=["without", "with"], resamples=500,
                        skip_java_metrics=True)
    t = res["comparisons"][0]["metrics"]
    assert t["change_f1"]["diff"] == 1.0 and t["change_f1"]["p"] < 0.01 and t["change_f1"]["n"] == 30
    assert t["temporal_f1"]["p"] < 0.01
    assert t["invented_comparison_rate"]["diff"] == -0.25 and t["invented_comparison_rate"]["n"] == 20
    assert len(t["change_f1"]["ci95"]) == 2 and t["change_f1"]["significant"]
    # the same file against itself: no difference, p = 1
    same = compare_files([b, b], None, names=["x", "y"], resamples=200, skip_java_metrics=True)
    assert same["comparisons"][0]["metrics"]["change_f1"]["p"] == 1.0


def test_viewer_shows_change_badges(tmp_path):
    from clinicalblip.viewer import view_predictions

    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _rows(good=False)))
    text = Path(view_predictions(p, tmp_path / "v.html", skip_java_metrics=True, bootstrap=0)).read_text()
    assert "changeBadges" in text and '"chg"' in text and "invented comparison" in text
    data = json.loads(text.split('<script type="application/json" id="viewer-data">')[1].split("</script>")[0])
    by = {c["id"]: c for c in data["cases"]}
    assert by["n0"]["chg"] == {"prior": False, "t": 0.0, "inv": True, "ref": {}, "pred": {"cardiomegaly": "unchanged"}}
    assert by["w1"]["chg"]["ref"] == {"pleural_effusion": "worse"} and by["w1"]["chg"]["pred"] == {}
    assert any(r["name"].startswith("change F1") for r in data["rows"])
