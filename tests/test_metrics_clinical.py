"""Clinical efficacy: the uncertain-label conventions, averaging, and deterministic bootstrap intervals."""

from __future__ import annotations

import pytest

from clinicalblip.errors import UserError
from clinicalblip.metrics.clinical import binarize, clinical_scores
from clinicalblip.metrics.labeler import COMMON_FIVE, OBSERVATIONS


def _rows(column: str, values):
    return [{column: v} for v in values]


def test_binarize_conventions():
    assert [binarize(v, "positive") for v in (1, -1, 0, None)] == [1, 1, 0, 0]
    assert [binarize(v, "negative") for v in (1, -1, 0, None)] == [1, 0, 0, 0]


def test_uncertain_as_positive_vs_negative():
    ref = _rows("Cardiomegaly", [1, 1, 0, -1])
    pred = _rows("Cardiomegaly", [1, 0, 1, -1])
    pos = clinical_scores(ref, pred, bootstrap=0)
    neg = clinical_scores(ref, pred, uncertain_as="negative", bootstrap=0)
    cm = pos["per_label"]["Cardiomegaly"]
    assert (cm["tp"], cm["fp"], cm["fn"], cm["tn"]) == (2, 1, 1, 0)
    assert cm["precision"] == pytest.approx(2 / 3) and cm["f1"] == pytest.approx(2 / 3)
    assert neg["per_label"]["Cardiomegaly"]["f1"] == pytest.approx(0.5)
    assert pos["uncertain_as"] == "positive" and neg["uncertain_as"] == "negative"
    assert "uncertain (-1) counted as negative" in neg["convention"]
    with pytest.raises(UserError):
        clinical_scores(ref, pred, uncertain_as="maybe")


def test_macro_micro_and_no_finding_blocks():
    ref = [{"Atelectasis": 1, "Edema": 1, "No Finding": None}, {"Atelectasis": 0, "Edema": 1},
           {"No Finding": 1}, {"Pleural Effusion": 1}]
    pred = [{"Atelectasis": 1, "Edema": None}, {"Atelectasis": 1, "Edema": 1}, {"No Finding": 1}, {}]
    out = clinical_scores(ref, pred, labeler="test", bootstrap=0)
    assert out["labeler"] == "test" and out["n"] == 4 and out["observations"] == list(OBSERVATIONS)
    per = out["per_label"]
    # micro over the five common observations pools their counts: Atelectasis tp1 fp1, Edema tp1 fn1, Effusion fn1
    assert out["micro_5"]["over"] == list(COMMON_FIVE)
    assert out["micro_5"]["precision"] == pytest.approx(2 / 3)
    assert out["micro_5"]["recall"] == pytest.approx(2 / 4)
    # macro over all 14, labels without support or predictions count as 0 (sklearn's zero_division=0)
    assert out["macro"]["f1"] == pytest.approx(sum(per[o]["f1"] for o in OBSERVATIONS) / 14)
    assert per["Fracture"]["f1"] == 0.0 and per["Fracture"]["support"] == 0
    assert out["no_finding"]["f1"] == 1.0 and per["No Finding"]["support"] == 1
    assert "bootstrap" not in out and "f1_ci95" not in out["macro"]


def test_bootstrap_is_deterministic_and_seeded():
    import random

    rng = random.Random(1)
    ref = [{o: rng.choice([1, 0, -1, None]) for o in OBSERVATIONS} for _ in range(120)]
    pred = [{o: rng.choice([1, 0, -1, None]) for o in OBSERVATIONS} for _ in range(120)]
    a = clinical_scores(ref, pred, bootstrap=1000, seed=0)
    b = clinical_scores(ref, pred, bootstrap=1000, seed=0)
    c = clinical_scores(ref, pred, bootstrap=1000, seed=1)
    assert a == b
    assert a["macro"]["f1_ci95"] != c["macro"]["f1_ci95"]
    assert a["bootstrap"] == {"resamples": 1000, "seed": 0, "interval": "percentile 2.5-97.5", "unit": "report"}
    for block in (a["macro"], a["micro_5"], a["micro"], a["no_finding"], a["per_label"]["Edema"]):
        lo, hi = block["f1_ci95"]
        assert 0.0 <= lo <= block["f1"] <= hi <= 1.0


def test_mismatched_or_empty_inputs():
    with pytest.raises(UserError):
        clinical_scores([{}], [], bootstrap=0)
    with pytest.raises(UserError):
        clinical_scores([], [], bootstrap=0)
