"""Report cleaning and the clinical-context normaliser, on hand-written cases and on real IU X-Ray text."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from clinicalblip.data.text import clean_report, encoding_problem, normalize_context, tidy_text

SHARED = Path(__file__).resolve().parents[2] / "shared"
IU_DEV = SHARED / "data" / "iu_xray_dev"


@pytest.mark.parametrize("raw,expected", [
    (None, None), ("", None), ("   ", None), ("None.", None), ("None", None), ("none available", None),
    ("N/A", None), ("Not provided.", None), ("No prior studies.", None), ("XXXX", None), ("XXXX.", None),
    ("XXXX, XXXX.", None), ("___", None), ("  Chest   pain.\n", "Chest pain."),
    ("XXXX-year-old female with chest pain.", "___-year-old female with chest pain."),
    ("XXXX XXXX XXXX and cough", "___ and cough"),
    ("___F with new onset ascites  // eval for infection", "___F with new onset ascites // eval for infection"),
    ("Positive PPD. XXXX.", "Positive PPD. ___."),
])
def test_normalize_context(raw, expected):
    assert normalize_context(raw) == expected


def test_tidy_text_keeps_marks_and_drops_placeholders():
    assert tidy_text("  XXXX-year-old\tmale ") == "XXXX-year-old male"
    assert tidy_text("None.") is None and tidy_text(float("nan")) is None
    assert tidy_text("XXXX") == "XXXX"  # faithful: the prompt normaliser decides


def test_clean_report():
    raw = "1. Bullous emphysema.There is XXXX scarring .  2. No effusion.. "
    assert clean_report(raw) == "Bullous emphysema. There is XXXX scarring. No effusion."
    assert clean_report(raw, deid="mark") == "Bullous emphysema. There is ___ scarring. No effusion."
    assert clean_report(raw, deid="drop") == "Bullous emphysema. There is scarring. No effusion."
    assert clean_report(None) == "" and clean_report("None.") == ""
    assert clean_report("Measures 2.5 cm.") == "Measures 2.5 cm."
    with pytest.raises(ValueError):
        clean_report("x", deid="nope")


def test_encoding_problem():
    assert encoding_problem("Normal heart size.") is None
    assert "U+FFFD" in encoding_problem("Normal \ufffd heart")
    assert "mojibake" in encoding_problem("patientâ€™s lungs")
    assert "mojibake" in encoding_problem("Ã©panchement")
    assert "control" in encoding_problem("clear\x00lungs")


@pytest.mark.skipif(not IU_DEV.is_dir(), reason="IU X-Ray dev files (../shared) not present")
def test_on_real_iu_reports():
    with open(IU_DEV / "indiana_reports_dev.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 1000
    indications = [normalize_context(r["indication"]) for r in rows]
    kept = [x for x in indications if x]
    # Most indications carry information; none that is kept is only marks or a placeholder.
    assert len(kept) / len(rows) > 0.85
    for x in kept:
        assert x == x.strip() and "  " not in x and "XXXX" not in x and "\n" not in x
        assert any(c.isalnum() for c in x.replace("___", ""))  # words, or ICD-9 codes such as "786.2"
        assert x[0] not in ",;:-/" and x[-1] not in ",;:-/"
    for r in rows:
        raw = r["indication"]
        if raw.strip().strip(".").replace("XXXX", "").strip(" ,.;") == "":
            assert normalize_context(raw) is None
    # Comparison "None." / "XXXX, XXXX" -> absent
    assert normalize_context("None.") is None
    comps = [normalize_context(r["comparison"]) for r in rows]
    assert sum(c is None for c in comps) > len(rows) / 2
    # Cleaned reports: no numbering, no double spaces, sentence ends followed by a space
    for r in rows[:500]:
        c = clean_report(r["impression"])
        assert "  " not in c and not c.startswith("1.")
        assert clean_report(c) == c  # idempotent
        f = clean_report(r["findings"], deid="drop")
        assert "XXXX" not in f and " ." not in f
