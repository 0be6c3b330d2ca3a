"""NLG metrics: R2Gen cleaning pinned, agreement with a direct pycocoevalcap computation, sanitising, Java errors,
and the offline `evaluate` module."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from clinicalblip.errors import UserError
from clinicalblip.metrics import nlg
from clinicalblip.metrics.nlg import clean_report_r2gen, compute_nlg

os.environ["HF_HUB_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared"
IU_DEV = SHARED / "data" / "iu_xray_dev"
KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
needs_java = pytest.mark.skipif(not nlg.java_available(), reason="Java is not installed")


def _r2gen_oracle(report: str) -> str:
    """Independent transcription of R2Gen's clean_report_iu_xray (cuhksz-nlp/R2Gen, modules/tokenizers.py), kept
    literal on purpose (its chained replaces and its regex, including the ':-\\[' range) as the test oracle."""
    def report_cleaner(t):
        t = t.replace("..", ".").replace("..", ".").replace("..", ".").replace("1. ", "")
        t = t.replace(". 2. ", ". ").replace(". 3. ", ". ").replace(". 4. ", ". ").replace(". 5. ", ". ")
        t = t.replace(" 2. ", ". ").replace(" 3. ", ". ").replace(" 4. ", ". ").replace(" 5. ", ". ")
        return t.strip().lower().split(". ")

    def sent_cleaner(t):
        t = t.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        return re.sub("[.,?;*!%^&_+():-\\[\\]{}]", "", t)

    return " . ".join(sent_cleaner(s) for s in report_cleaner(report)) + " ."


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("1. The heart is normal. 2. No effusion.", "the heart is normal . no effusion ."),
        ("Lungs clear..", "lungs clear ."),
        ("T-spine: mild (old) changes; stable.", "t-spine mild old changes stable ."),  # hyphen survives
        ("", " ."),
        ("Size 2.5 cm.", "size 25 cm ."),
        ('Patient\'s "AP/PA" view.', "patients appa view ."),
        ("A. . B", "a .  . b ."),  # empty sentences are kept, as R2Gen does
    ],
)
def test_r2gen_cleaning_pinned(raw, cleaned):
    assert clean_report_r2gen(raw) == cleaned
    assert _r2gen_oracle(raw) == cleaned


def test_r2gen_mimic_variant_folds_whitespace():
    text = "Lungs  clear.\n\nNo  effusion__here."
    assert clean_report_r2gen(text, "mimic_cxr") == "lungs clear . no effusionhere ."
    assert clean_report_r2gen(text, "iu_xray") == "lungs  clear\n\nno  effusionhere ."


def test_cleaning_matches_oracle_on_odd_strings():
    import random

    rng = random.Random(0)
    alphabet = list("abcXYZ .,;:-_[]{}()<>=@?!\"'/\\|\n\t12345") + ["1. ", " 2. ", "..", "__", "  "]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert clean_report_r2gen(text) == _r2gen_oracle(text), repr(text)


@needs_java
@pytest.mark.skipif(not (IU_DEV / "annotation.json").is_file(), reason="../shared/data/iu_xray_dev not available")
def test_nlg_equals_direct_pycocoevalcap_on_iu_xray():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ann = json.loads((IU_DEV / "annotation.json").read_text())
    refs = [e["report"] for e in ann["test"]]
    preds = refs[1:] + refs[:1]  # a plausible but wrong report for each study
    preds[3] = ""
    meteor = Meteor()  # its JVM loads in the background while ours runs (wall time, not CPU, is the cost)
    ours = compute_nlg(refs, preds, protocol="r2gen")

    gts = {i: [_r2gen_oracle(r)] for i, r in enumerate(refs)}
    res = {i: [_r2gen_oracle(p)] for i, p in enumerate(preds)}
    direct = dict(zip(KEYS[:4], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    direct["METEOR"] = meteor.compute_score(gts, res)[0]
    del meteor
    direct["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert ours["protocol"] == "r2gen" and ours["n"] == len(refs)
    for key in KEYS:
        assert isinstance(ours[key], float)
        assert abs(ours[key] - float(direct[key])) < 1e-4, key
    assert 0.05 < ours["BLEU_4"] < ours["BLEU_1"] < 1


def test_meteor_input_is_sanitised():
    assert nlg._meteor_safe("a ||| b\nc\r\nd\u2028e\x85f") == "a  b c  d e f"


@needs_java
def test_newlines_and_separators_cannot_break_meteor():
    refs, preds = ["The lungs are clear. No effusion.", "Heart size normal."], ["Lungs clear.", "heart size normal."]
    before = compute_nlg(refs, preds)
    hazards = compute_nlg(["The lungs are clear.\nNo effusion. ||| |||", "Heart size normal.\r\n|||"],
                          ["Lungs clear ||| no\neffusion.", "heart\u2028size normal |||"])
    assert 0 < hazards["METEOR"] <= 1
    # the shared METEOR process is still in step: the same input scores exactly as before
    assert compute_nlg(refs, preds) == before


@needs_java
def test_empty_predictions_score_zero_without_crashing():
    got = compute_nlg(["The heart is normal.", "No effusion."], ["", "   "])
    assert got["n"] == 2
    assert all(got[k] is not None and got[k] >= 0 for k in KEYS)
    assert got["CIDEr"] == 0.0


def test_skip_meteor_needs_no_java(monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    got = compute_nlg(["The heart is normal."], ["The heart is normal."], skip=("METEOR",))
    assert got["METEOR"] is None and got["skipped"] == ["METEOR"]
    assert got["BLEU_1"] > 0.99


def test_missing_java_is_a_clear_user_error(monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as exc:
        compute_nlg(["a b c."], ["a b c."])
    msg = str(exc.value)
    assert "Java" in msg and "METEOR" in msg and "--skip-java-metrics" in msg
    with pytest.raises(UserError, match="PTB tokenizer"):
        compute_nlg(["a b c."], ["a b c."], protocol="coco-ptb", skip=("METEOR",))


def test_bad_inputs():
    with pytest.raises(UserError, match="pair up"):
        compute_nlg(["a"], ["a", "b"], skip=("METEOR",))
    with pytest.raises(UserError, match="protocol"):
        compute_nlg(["a"], ["a"], protocol="bleu-please", skip=("METEOR",))
    with pytest.raises(UserError, match="empty"):
        compute_nlg([], [], skip=("METEOR",))


@needs_java
def test_coco_ptb_protocol_matches_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = ["The heart is normal in size.", "No pleural effusion, pneumothorax; T-spine OK.", "Clear lungs."]
    preds = ["Heart normal.", "", "The lungs are clear (no effusion)."]
    ours = nlg.ptb_tokenize(refs + preds)
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(refs + preds)})
    assert ours == [theirs[i][0] for i in range(len(refs + preds))]
    got = compute_nlg(refs, preds, protocol="coco-ptb", skip=("METEOR",))
    assert got["protocol"] == "coco-ptb" and got["BLEU_1"] > 0


@needs_java
def test_evaluate_module_loads_offline_and_matches(tmp_path, monkeypatch):
    # offline, and caches in tmp (read by evaluate at import, so set before it is imported)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_METRICS_CACHE", str(tmp_path / "metrics"))
    evaluate = pytest.importorskip("evaluate")
    from clinicalblip.metrics import evaluate_module_path

    refs = ["The heart is normal in size. The lungs are clear.", "Small left pleural effusion.",
            "No pneumothorax.\nMild cardiomegaly."]
    preds = ["Heart size is normal. Lungs are clear.", "", "Mild cardiomegaly. No pneumothorax."]
    metric = evaluate.load(evaluate_module_path())
    got = metric.compute(predictions=preds, references=refs)
    want = compute_nlg(refs, preds)
    assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}
    assert got["protocol"] == "r2gen" and got["n"] == 3
