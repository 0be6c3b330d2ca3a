"""Every named CheXbert-F1 convention: hand-computed fixtures, sklearn on random label matrices, and the keys that
`clinicalblip eval --labeler chexpert` writes on real IU X-Ray reports (when ../shared is present)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from clinicalblip import cli
from clinicalblip.metrics.conventions import (
    LABEL_SETS, convention_keys, convention_scores, corpus_f1, disagreements, example_based, label_matrix,
    per_case_example_f1,
)
from clinicalblip.metrics.labeler import COMMON_FIVE, OBSERVATIONS, ChexpertRuleLabeler

IU_DEV = Path(__file__).resolve().parents[1] / ".." / ".." / "shared" / "data" / "iu_xray_dev"
if not IU_DEV.is_dir():
    IU_DEV = Path("/work/shared/data/iu_xray_dev")


def _sk(refs, preds, prefix):
    """The same keys from sklearn directly."""
    out = {}
    for u, suffix in (("positive", "upos"), ("negative", "uneg")):
        y, p = label_matrix(refs, u), label_matrix(preds, u)
        for n, members in LABEL_SETS.items():
            cols = [OBSERVATIONS.index(m) for m in members]
            for avg in ("micro", "macro"):
                out[f"{prefix}_{avg}{n}_{suffix}"] = f1_score(y[:, cols], p[:, cols], average=avg, zero_division=0)
    y, p = label_matrix(refs, "negative"), label_matrix(preds, "negative")
    pr, rc, f, _ = precision_recall_fscore_support(y, p, average="samples", zero_division=0)
    out[f"{prefix}_example_precision"], out[f"{prefix}_example_recall"], out[f"{prefix}_example_f1"] = pr, rc, f
    return out


def test_hand_computed_fixture():
    # Cardiomegaly: ref [1, -1, 0], pred [1, 1, -1]. Edema: ref [1, 0, 0], pred [0, 0, 0]. Nothing else anywhere.
    refs = [{"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": -1}, {"Cardiomegaly": 0}]
    preds = [{"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {"Cardiomegaly": -1, "Edema": 0}]
    s = convention_scores(refs, preds, "x")
    assert list(s) == convention_keys("x") and len(s) == 11
    # upos: Cardiomegaly tp 2 fp 1 fn 0 -> F1 0.8; Edema tp 0 fn 1 -> 0. micro: tp 2 fp 1 fn 1 -> 4/6.
    assert s["x_micro5_upos"] == pytest.approx(4 / 6) and s["x_micro14_upos"] == pytest.approx(4 / 6)
    assert s["x_macro5_upos"] == pytest.approx(0.8 / 5)  # three of the five never occur: 0 each
    assert s["x_macro14_upos"] == pytest.approx(0.8 / 14)
    # uneg: Cardiomegaly tp 1 fp 1 fn 0 -> 2/3; Edema 0. micro: tp 1 fp 1 fn 1 -> 0.5.
    assert s["x_micro5_uneg"] == pytest.approx(0.5) and s["x_macro5_uneg"] == pytest.approx((2 / 3) / 5)
    # example-based (positives only): report 1 P 1 R 0.5 F 2/3; report 2 P 0 R 0 (undefined) F 0; report 3 all 0.
    assert s["x_example_precision"] == pytest.approx(1 / 3)
    assert s["x_example_recall"] == pytest.approx(0.5 / 3)
    assert s["x_example_f1"] == pytest.approx((2 / 3) / 3)
    assert per_case_example_f1(refs, preds).tolist() == pytest.approx([2 / 3, 0, 0])


def test_no_support_on_either_side_scores_zero():
    y = np.zeros((3, 2), dtype=int)
    assert corpus_f1(y, y) == (0.0, 0.0)
    assert example_based(y, y) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_every_key_matches_sklearn_on_random_labels(seed):
    rng = random.Random(seed)
    values = [1, 0, -1, None]
    n = rng.choice([1, 5, 40])

    def row():
        # sparse labels so that some observations never occur (the zero_division path)
        return {o: rng.choice(values) if rng.random() < 0.4 else None for o in OBSERVATIONS[: rng.randint(3, 14)]}

    refs, preds = [row() for _ in range(n)], [row() for _ in range(n)]
    ours, theirs = convention_scores(refs, preds, "chexbert"), _sk(refs, preds, "chexbert")
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-12), k


def test_label_sets_and_disagreements():
    assert LABEL_SETS["5"] == COMMON_FIVE and len(LABEL_SETS["14"]) == 14
    d = disagreements({"Edema": 1, "Cardiomegaly": 0}, {"Edema": -1, "Cardiomegaly": 0})
    assert d == [{"observation": "Edema", "reference": 1, "prediction": -1}]


def _iu_records():
    ann = json.loads((IU_DEV / "annotation.json").read_text(encoding="utf-8"))
    test = ann["test"]
    # A "model" that writes the next study's report: realistic label noise, deterministic.
    return [{"id": r["id"], "reference": r["report"], "prediction": test[(i + 1) % len(test)]["report"]}
            for i, r in enumerate(test)]


@pytest.mark.skipif(not (IU_DEV / "annotation.json").is_file(), reason="../shared/data/iu_xray_dev not available")
def test_eval_on_iu_xray_dev_writes_every_key_and_each_equals_sklearn(tmp_path):
    recs = _iu_records()
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", str(preds), "--out", str(out), "--labeler", "chexpert", "--bootstrap", "0",
                     "--skip-java-metrics", "--no-report"]) == 0
    m = json.loads(out.read_text())
    lab = ChexpertRuleLabeler()
    expected = _sk(lab.label([r["reference"] for r in recs]), lab.label([r["prediction"] for r in recs]), "rules")
    assert sorted(m["clinical"]["conventions"]) == sorted(convention_keys("rules"))
    for k in convention_keys("rules"):
        assert m[k] == pytest.approx(expected[k], abs=1e-12), k
    # IU: several of the 14 never occur in the test split, so macro-14 sits well below micro-14.
    assert m["rules_macro14_upos"] < m["rules_micro14_upos"]
