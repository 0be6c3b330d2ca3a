"""`clinicalblip eval` and `clinicalblip label` end to end (in process, so the METEOR JVM is shared), the synthetic
clinical mode, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import sys
import types
from pathlib import Path

import pytest

from clinicalblip import cli
from clinicalblip.metrics import nlg
from clinicalblip.metrics.labeler import OBSERVATIONS

os.environ["HF_HUB_OFFLINE"] = "1"

KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
    "Right lower lobe consolidation, possibly pneumonia. No pneumothorax.",
    "Stable calcified granuloma in the right upper lobe. No acute cardiopulmonary abnormality.",
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _preds(tmp_path: Path, predictions, name="preds.jsonl", provenance=True, **extra) -> Path:
    rows = [{"_provenance": {"model": "tiny", "template": "findings_with_context", "num_beams": 1}}] if provenance else []
    rows += [{"id": f"s{i}", "prediction": p, "reference": r, **extra} for i, (p, r) in enumerate(zip(predictions, REPORTS))]
    return _write_jsonl(tmp_path / name, rows)


@pytest.mark.skipif(not nlg.java_available(), reason="Java is not installed")
def test_eval_cli_end_to_end(tmp_path, capsys):
    preds = _preds(tmp_path, [REPORTS[0], "Cardiomegaly. Small left pleural effusion.", "", REPORTS[3]])
    out = tmp_path / "run" / "metrics.json"
    assert cli.main(["eval", str(preds), "--out", str(out), "--bootstrap", "200", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU_1" in printed and "clinical macro F1" in printed

    m = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(m[key], float) and 0 <= m[key]
    assert m["protocol"] == "r2gen" and m["n"] == 4 and m["empty_predictions"] == 1
    assert m["provenance"]["template"] == "findings_with_context"  # the provenance line is not a record
    c = m["clinical"]
    assert c["labeler"] == "chexpert-rules" and c["uncertain_as"] == "positive" and c["n"] == 4
    assert list(c["per_label"]) == list(OBSERVATIONS)
    assert {"macro", "micro_5", "micro", "no_finding", "bootstrap"} <= set(c)
    assert c["bootstrap"]["resamples"] == 200 and c["bootstrap"]["seed"] == 3
    assert m["clinical_macro_f1"] == c["macro"]["f1"]
    assert c["per_label"]["Cardiomegaly"]["tp"] == 1 and c["per_label"]["Pleural Effusion"]["tp"] == 1
    assert c["per_label"]["Pneumonia"]["fn"] == 1  # the empty prediction misses it
    report = (out.parent / "report.md").read_text()
    assert "| BLEU_1 |" in report and "Cardiomegaly" in report and "per_label_f1.png" in report
    assert (out.parent / "per_label_f1.png").stat().st_size > 1000

    # the same file again: identical numbers (bootstrap seeded, one METEOR process reused)
    again = tmp_path / "again.json"
    assert cli.main(["eval", str(preds), "--out", str(again), "--bootstrap", "200", "--seed", "3", "--no-report"]) == 0
    m2 = json.loads(again.read_text())
    assert {k: m2[k] for k in KEYS} == {k: m[k] for k in KEYS} and m2["clinical"] == c
    assert not (tmp_path / "again.report.md").exists()


def test_eval_perfect_predictions_and_skip_java(tmp_path, monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)  # as on a machine without Java
    preds = _preds(tmp_path, REPORTS, provenance=False)
    out = tmp_path / "perfect.json"
    assert cli.main(["eval", str(preds), "--out", str(out), "--skip-java-metrics", "--bootstrap", "0"]) == 0
    m = json.loads(out.read_text())
    assert m["METEOR"] is None and m["skipped"] == ["METEOR"]
    assert m["BLEU_4"] > 0.99 and m["ROUGE_L"] > 0.99
    c = m["clinical"]
    assert c["micro_5"]["f1"] == 1.0 and c["no_finding"]["f1"] == 1.0
    assert all(b["f1"] == 1.0 for b in c["per_label"].values() if b["support"])
    assert (tmp_path / "perfect.report.md").is_file() and (tmp_path / "perfect_f1.png").is_file()
    from clinicalblip.metrics.report import comparison_table

    table = comparison_table({"real indication": out, "again": m})
    assert table.count("\n") == 4 and "| real indication | 1.0000 |" in table and "| n/a |" in table
    # without Java and without the skip flag: one clear line naming METEOR and the way out
    assert cli.main(["eval", str(preds), "--out", str(out)]) == 2


def test_eval_synthetic_mode_uses_true_labels(tmp_path, monkeypatch):
    fake = types.ModuleType("clinicalblip.data.synth")
    fake.FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "nodule")
    fake.label_report = lambda text: {f: int(f.replace("_", " ") in text.lower()) for f in fake.FINDINGS}
    monkeypatch.setitem(sys.modules, "clinicalblip.data.synth", fake)
    labels = [{"cardiomegaly": 1}, {"pleural_effusion": 1, "nodule": 1}, {"pneumothorax": 1}, {"consolidation": 1}]
    preds = ["Cardiomegaly.", "Pleural effusion.", "Nothing to see.", "Consolidation and cardiomegaly."]
    rows = [{"id": i, "prediction": p, "reference": r, "dataset": "synthetic", "labels": lab}
            for i, (p, r, lab) in enumerate(zip(preds, REPORTS, labels))]
    path = _write_jsonl(tmp_path / "synth.jsonl", rows)
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", str(path), "--out", str(out), "--skip-java-metrics", "--bootstrap", "50"]) == 0
    m = json.loads(out.read_text())
    c = m["clinical"]
    assert c["labeler"].startswith("synthetic") and c["observations"] == list(fake.FINDINGS)
    per = c["per_label"]
    assert per["cardiomegaly"]["tp"] == 1 and per["cardiomegaly"]["fp"] == 1
    assert per["pneumothorax"]["fn"] == 1 and per["nodule"]["fn"] == 1
    assert m["clinical_macro_f1"] == pytest.approx(sum(b["f1"] for b in per.values()) / 5)
    # mixing synthetic and real records under --labeler auto is refused
    _write_jsonl(tmp_path / "mixed.jsonl", rows + [{"id": "x", "prediction": "a", "reference": "b"}])
    assert cli.main(["eval", str(tmp_path / "mixed.jsonl"), "--out", str(out), "--skip-java-metrics"]) == 2


def test_eval_synthetic_with_the_real_synth_parser(tmp_path):
    from clinicalblip.data import synth  # part of the package: a missing function is a failure, not a skip

    assert callable(synth.label_report)
    rows = [{"id": i, "prediction": "The heart is enlarged. Small right pleural effusion.", "reference": REPORTS[1],
             "dataset": "synthetic", "labels": {f: int(f in ("cardiomegaly", "pleural_effusion")) for f in synth.FINDINGS}}
            for i in range(3)]
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", str(_write_jsonl(tmp_path / "p.jsonl", rows)), "--out", str(out),
                     "--skip-java-metrics", "--bootstrap", "0", "--no-report"]) == 0
    m = json.loads(out.read_text())
    assert m["clinical"]["per_label"]["cardiomegaly"]["f1"] == 1.0
    assert 0 <= m["clinical_macro_f1"] <= 1


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ('{"id": 1, "prediction": "a", "reference": "b"}\n{oops\n', ":2: not valid JSON"),
    ('{"id": 1, "prediction": "a"}\n', "no 'reference' field"),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"_provenance": {"model": "m"}}\n', "no prediction records"),
])
def test_eval_bad_input_is_one_clear_line(tmp_path, capsys, content, needle):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    assert cli.main(["eval", str(path), "--out", str(tmp_path / "m.json"), "--skip-java-metrics"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_label_cli_jsonl_and_predictions(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "reports.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(REPORTS)])
    out = tmp_path / "labels.csv"
    assert cli.main(["label", str(src), "--out", str(out)]) == 0
    assert "labeled 4 reports" in capsys.readouterr().out
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", *OBSERVATIONS] and [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert rows[0]["No Finding"] == "1" and rows[0]["Pleural Effusion"] == "0" and rows[0]["Edema"] == ""
    assert rows[1]["Cardiomegaly"] == "1" and rows[1]["Atelectasis"] == "1" and rows[1]["No Finding"] == ""
    assert rows[2]["Pneumonia"] == "-1" and rows[3]["No Finding"] == ""

    # a predictions file: its 'prediction' field is labeled, the provenance line skipped
    preds = _preds(tmp_path, ["Small right pneumothorax.", "", "Cannot exclude pneumonia.", "Lungs clear."])
    out2 = tmp_path / "pred_labels.csv"
    assert cli.main(["label", str(preds), "--out", str(out2)]) == 0
    with out2.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["Pneumothorax"] for r in rows] == ["1", "", "", ""] and rows[2]["Pneumonia"] == "-1"
    # --field picks another text field
    out3 = tmp_path / "ref_labels.csv"
    assert cli.main(["label", str(preds), "--out", str(out3), "--field", "reference"]) == 0
    with out3.open(newline="") as fh:
        assert list(csv.DictReader(fh))[1]["Cardiomegaly"] == "1"


def test_label_cli_errors(tmp_path, capsys):
    assert cli.main(["label", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "l.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "body": "x"}])
    assert cli.main(["label", str(bad), "--out", str(tmp_path / "l.csv")]) == 2
    assert "no 'text' (or prediction) field" in capsys.readouterr().err
    assert cli.main(["label", str(bad), "--out", str(tmp_path / "l.csv"), "--labeler", "chexbert"]) == 2
    assert "chexbert" in capsys.readouterr().err
