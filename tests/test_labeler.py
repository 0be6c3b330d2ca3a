"""The CheXpert-style rule labeler: pinned negation / uncertainty cases, aggregation, No Finding, the pluggable
interface, speed, and F1 against the NegBio OpenI expert labels on the IU X-Ray dev half (when ../shared exists)."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest

from clinicalblip.errors import UserError
from clinicalblip.metrics.labeler import (
    OBSERVATIONS, CheXbertLabeler, ChexpertRuleLabeler, Labeler, get_labeler, label_report,
)

os.environ["HF_HUB_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared"
IU_DEV = SHARED / "data" / "iu_xray_dev"

PE, PTX, CM, ATL, NF = "Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Atelectasis", "No Finding"


@pytest.mark.parametrize(
    "text, expected",
    [
        # negation: before, after, across a list, and its limits
        ("No pleural effusion or pneumothorax.", {PE: 0, PTX: 0, NF: 1}),
        ("No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or pneumothorax is identified.",
         {PE: 0, PTX: 0, "Consolidation": 0, "Lung Opacity": 0, NF: 1}),
        ("Pleural effusion is not seen.", {PE: 0}),
        ("Pneumothorax has resolved.", {PTX: 0}),
        ("Interval resolution of the left pleural effusion.", {PE: 0}),
        ("The heart is not enlarged.", {CM: 0, NF: 1}),
        ("Heart size is normal.", {CM: 0}),
        ("Pneumonia is unlikely.", {"Pneumonia": 0}),
        ("There is no pleural effusion, but there is a small pneumothorax.", {PE: 0, PTX: 1, NF: None}),
        ("Heart size normal and large right pleural effusion.", {CM: 0, PE: 1}),
        ("Cardiomegaly without pulmonary edema.", {CM: 1, "Edema": 0}),
        # pseudo-negation: "no change" keeps the finding
        ("No change in the moderate right pleural effusion.", {PE: 1}),
        ("No significant change in right pneumothorax or pleural fluid.", {PTX: 1, PE: 1}),
        # uncertainty
        ("Cannot exclude a small left pleural effusion.", {PE: -1, NF: None}),
        ("Pleural effusion cannot be excluded.", {PE: -1}),
        ("Findings may represent atelectasis.", {ATL: -1}),
        ("Possible right lower lobe pneumonia.", {"Pneumonia": -1}),
        # a differential without a modal names an opacity that is there: each reading counts (OpenI experts agree)
        ("Left basilar atelectasis or scarring.", {ATL: 1}),
        ("Streaky opacity, atelectasis versus infiltrate.", {ATL: 1}),
        ("Opacity may represent atelectasis or pneumonia.", {ATL: -1, "Pneumonia": -1}),
        ("Opacity in the right lower lobe, suspicious for pneumonia.", {"Pneumonia": -1, "Lung Opacity": 1}),
        ("Borderline cardiomegaly.", {CM: -1}),
        # positives
        ("Small left pleural effusion.", {PE: 1, NF: None}),
        ("The heart is mildly enlarged.", {CM: 1}),
        ("There is a small right apical pneumothorax.", {PTX: 1}),
        ("Right upper lobe consolidation consistent with pneumonia.",
         {"Consolidation": 1, "Pneumonia": 1, "Support Devices": None}),  # no "stent" inside "consistent"
        ("Enlarged cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": 1, CM: -1}),
        ("Pulmonary nodule in the right upper lobe.", {"Lung Lesion": 1}),
        ("Pleural thickening at the left base.", {"Pleural Other": 1}),
        ("Old healed left rib fracture.", {"Fracture": 1}),
        # aggregation: positive > uncertain > negative
        ("No effusion. Small pleural effusion on the left.", {PE: 1}),
        ("No pneumothorax. Possible pneumothorax at the apex.", {PTX: -1}),
        # not an assertion about the patient
        ("Evaluation for pneumothorax is limited.", {PTX: None}),
    ],
)
def test_pinned_cases(text, expected):
    got = label_report(text)
    assert set(got) == set(OBSERVATIONS)
    for obs, value in expected.items():
        assert got[obs] == value, (text, obs, got)


def test_no_finding_follows_chexpert_aggregation():
    # support devices do not veto No Finding
    assert label_report("Right PICC line tip in the SVC. Lungs are clear.")[NF] == 1
    assert label_report("Right PICC line tip in the SVC.")["Support Devices"] == 1
    # any positive or uncertain observation does
    assert label_report("Heart size normal. Possible small effusion.")[NF] is None
    # ... and so do abnormalities outside the 14 (CheXpert's no-finding veto list), unless negated
    assert label_report("Stable calcified granuloma. Lungs clear.")[NF] is None
    assert label_report("Mild degenerative changes of the thoracic spine.")[NF] is None
    assert label_report("No scoliosis. Lungs clear.")[NF] == 1
    # a report that mentions nothing is No Finding, as in CheXpert
    assert label_report("")[NF] == 1
    assert label_report("No acute cardiopulmonary abnormality.")[NF] == 1


def test_labeler_interface_and_batch():
    labeler = ChexpertRuleLabeler()
    assert isinstance(labeler, Labeler) and labeler.name == "chexpert-rules"
    rows = labeler.label(["Small left pleural effusion.", None, "No pneumothorax."])
    assert [r[PE] for r in rows] == [1, None, None] and rows[2][PTX] == 0
    assert isinstance(get_labeler("chexpert"), ChexpertRuleLabeler)
    with pytest.raises(UserError, match="unknown labeler"):
        get_labeler("magic")


def test_chexbert_needs_local_weights_and_never_falls_back(tmp_path):
    with pytest.raises(UserError, match="weights"):
        get_labeler("chexbert")
    with pytest.raises(UserError, match="not found"):
        CheXbertLabeler(tmp_path / "missing.pth", tmp_path)
    weights = tmp_path / "chexbert.pth"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="tokenizer"):
        CheXbertLabeler(weights, tmp_path / "no-tokenizer")


def _dev_reports() -> list[str]:
    with (IU_DEV / "indiana_reports_dev.csv").open(newline="", encoding="utf-8") as fh:
        return [f"{r['findings']} {r['impression']}" for r in csv.DictReader(fh)]


def test_labels_4000_reports_in_under_10_seconds():
    if (IU_DEV / "indiana_reports_dev.csv").is_file():
        base = _dev_reports()
    else:
        base = ["The heart is normal in size. No pleural effusion or pneumothorax. Mild degenerative changes.",
                "Left basilar atelectasis or scarring. Possible small effusion. Right PICC tip in the SVC.",
                "Cardiomegaly with mild pulmonary edema. Cannot exclude pneumonia. Stable calcified granuloma."]
    texts = (base * (4000 // len(base) + 1))[:4000]
    labeler = ChexpertRuleLabeler()
    start = time.perf_counter()
    labels = labeler.label(texts)
    elapsed = time.perf_counter() - start
    assert len(labels) == 4000
    assert elapsed < 10.0, f"4,000 reports took {elapsed:.1f} s"


@pytest.mark.skipif(not (IU_DEV / "negbio_openi_gold14_dev.csv").is_file(),
                    reason="../shared/data/iu_xray_dev not available")
def test_f1_against_expert_labels_on_iu_xray_dev():
    """Findings + impression vs NegBio's OpenI gold labels, uncertain counted as positive.

    On the dev half (1,927 reports) this gave: Cardiomegaly 0.979, Atelectasis 0.914, Pleural Effusion 0.889,
    Pneumothorax 0.909, No Finding 0.921. The required floor is 0.85 for these five.
    """
    with (IU_DEV / "indiana_reports_dev.csv").open(newline="", encoding="utf-8") as fh:
        reports = {r["uid"]: f"{r['findings']} {r['impression']}" for r in csv.DictReader(fh)}
    with (IU_DEV / "negbio_openi_gold14_dev.csv").open(newline="", encoding="utf-8") as fh:
        gold = {g["filename"].removeprefix("CXR"): g for g in csv.DictReader(fh)}
    uids = sorted(set(reports) & set(gold), key=int)
    assert len(uids) > 1000
    labels = dict(zip(uids, ChexpertRuleLabeler().label([reports[u] for u in uids])))
    pairs = {"Cardiomegaly": CM, "Effusion": PE, "Atelectasis": ATL, "Pneumothorax": PTX, "normal": NF}
    scores = {}
    for gold_col, obs in pairs.items():
        tp = fp = fn = 0
        for u in uids:
            y = gold[u][gold_col] == "1"
            p = labels[u][obs] in (1, -1)
            tp, fp, fn = tp + (y and p), fp + (p and not y), fn + (y and not p)
        scores[obs] = 2 * tp / (2 * tp + fp + fn)
    print({k: round(v, 3) for k, v in scores.items()})
    assert all(v >= 0.85 for v in scores.values()), scores


def test_a_bone_lesion_is_not_a_lung_lesion():
    assert label_report("Expansile lesion of the right posterior 9th rib.")["Lung Lesion"] is None
    assert label_report("Sclerotic lesion in the T8 vertebral body.")["Lung Lesion"] is None
    # projecting over a rib is still a lung finding
    assert label_report("Nodular opacity projecting over the left 5th rib.")["Lung Lesion"] == 1


def test_strong_hedges_are_positive_weak_ones_uncertain():
    assert label_report("Left basilar opacity, likely atelectasis.")["Atelectasis"] == 1
    assert label_report("Findings suggestive of mild pulmonary edema.")["Edema"] == 1
    assert label_report("Probable small right pleural effusion.")["Pleural Effusion"] == 1
    assert label_report("Left basilar opacity may represent atelectasis.")["Atelectasis"] == -1
    assert label_report("Cannot exclude early pneumonia.")["Pneumonia"] == -1
    assert label_report("Possible small right pleural effusion.")["Pleural Effusion"] == -1


_DEV = IU_DEV if IU_DEV.is_dir() else Path("/work/shared/data/iu_xray_dev")
GOALS = {"Atelectasis": ("Atelectasis", 0.90), "Cardiomegaly": ("Cardiomegaly", 0.90),
         "Pleural Effusion": ("Effusion", 0.90), "Pneumothorax": ("Pneumothorax", 0.90), "No Finding": ("normal", 0.90),
         "Edema": ("Edema", 0.85), "Consolidation": ("Consolidation", 0.85), "Pneumonia": ("Pneumonia", 0.75),
         "Lung Lesion": ("Mass|Nodule", 0.75)}


@pytest.mark.skipif(not (_DEV / "negbio_openi_gold14_dev.csv").is_file(), reason="../shared/data/iu_xray_dev absent")
def test_goals_against_expert_labels_with_uncertain_as_negative():
    """benchmarks/labeler_gold.py's numbers (uncertain = negative) stay at the issue's goals on the even half."""
    with (_DEV / "indiana_reports_dev.csv").open(newline="", encoding="utf-8") as fh:
        reports = {r["uid"]: f"{r['findings']} {r['impression']}" for r in csv.DictReader(fh)}
    with (_DEV / "negbio_openi_gold14_dev.csv").open(newline="", encoding="utf-8") as fh:
        gold = {g["filename"].removeprefix("CXR"): g for g in csv.DictReader(fh)}
    uids = sorted(set(reports) & set(gold), key=int)
    labels = dict(zip(uids, ChexpertRuleLabeler().label([reports[u] for u in uids])))
    scores = {}
    for obs, (cols, goal) in GOALS.items():
        y = [any(gold[u][c] == "1" for c in cols.split("|")) for u in uids]
        p = [labels[u][obs] == 1 for u in uids]
        tp = sum(a and b for a, b in zip(y, p))
        scores[obs] = 2 * tp / (sum(y) + sum(p))
    assert all(scores[o] >= g for o, (_, g) in GOALS.items()), scores
