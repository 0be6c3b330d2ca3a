"""Report section parsing with the official MIMIC-CXR parser's rules, on reports written in MIMIC's style."""

from __future__ import annotations

import pytest

from clinicalblip.data.sections import normalize_section_name, parse_report, report_fields, split_sections

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with fever and cough  // r/o pneumonia
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax.  The cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""


def test_standard_report_sections():
    sec = parse_report(STANDARD)
    assert sec["examination"] == "CHEST (PA AND LAT)"
    assert sec["indication"] == "___F with fever and cough // r/o pneumonia"
    assert sec["technique"] == "Chest PA and lateral"
    assert sec["comparison"] == "___"
    assert sec["findings"].startswith("The lungs are clear") and sec["findings"].endswith("silhouette is normal.")
    assert sec["impression"] == "No acute cardiopulmonary process."
    assert sec["preamble"] == "FINAL REPORT"


@pytest.mark.parametrize("header,canonical", [
    ("INDICATION", "indication"), ("REASON FOR EXAMINATION", "indication"), ("REASON FOR EXAM", "indication"),
    ("CLINICAL INDICATION", "indication"), ("HISTORY", "history"), ("CLINICAL HISTORY", "history"),
    ("CLINICAL INFORMATION", "history"), ("PATIENT HISTORY", "history"), ("COMPARISON", "comparison"),
    ("COMPARISONS", "comparison"), ("COMPARISON EXAM", "comparison"), ("FINDINGS", "findings"),
    ("FINDING", "findings"), ("PA AND LATERAL VIEWS OF THE CHEST", "findings"), ("PORTABLE AP CHEST", "findings"),
    ("CHEST, TWO VIEWS", "findings"), ("IMPRESSION", "impression"), ("CONCLUSION", "impression"),
    ("FINDINGS AND IMPRESSION", "impression"), ("FINDINGS/IMPRESSION", "impression"), ("IMPRESSON", "impression"),
    ("IMPRESSION ON PRELIMINARY READ", "impression"), ("WET READ", "wet read"), ("NOTIFICATION", "notification"),
])
def test_header_variants(header, canonical):
    assert normalize_section_name(header) == canonical


def test_variant_headers_fill_the_manifest_fields():
    text = (" WET READ: ___ ___ ___ 4:12 PM\n  No pneumonia.\n"
            " ______________________________________________________________________________\n"
            "                                 FINAL REPORT\n"
            " REASON FOR EXAMINATION:  Evaluation of the patient with shortness of breath.\n \n"
            " CLINICAL INFORMATION:  ___-year-old man with COPD.\n \n"
            " COMPARISONS:  Chest radiograph from ___.\n \n"
            " PA AND LATERAL VIEWS OF THE CHEST:  Hyperinflated lungs.  No focal opacity.\n \n"
            " CONCLUSION:  Emphysema, no pneumonia.\n")
    f = report_fields(text)
    assert f == {
        "indication": "Evaluation of the patient with shortness of breath.",
        "history": "___-year-old man with COPD.",
        "comparison": "Chest radiograph from ___.",
        "findings": "Hyperinflated lungs. No focal opacity.",
        "impression": "Emphysema, no pneumonia.",
    }


def test_empty_findings_section_is_dropped_and_later_one_wins():
    text = " CHEST, PA LATERAL:\n \n INDICATION:  Cough.\n \n FINDINGS:\n \n IMPRESSION:  Clear lungs.\n"
    names = [n for n, _ in split_sections(text)]
    assert "findings" not in names  # both "findings"-like sections were empty
    assert report_fields(text)["impression"] == "Clear lungs."
    assert report_fields(text)["findings"] is None


def test_no_findings_or_impression_uses_last_paragraph():
    text = (" EXAMINATION:  Chest radiograph.\n \n INDICATION:  Line placement.\n"
            " Right IJ line in place.\n \n The tip projects over the cavoatrial junction.  No pneumothorax.\n")
    sec = parse_report(text)
    assert sec["last_paragraph"] == "The tip projects over the cavoatrial junction. No pneumothorax."
    assert report_fields(text)["impression"] == sec["last_paragraph"]


def test_report_without_headers_is_findings():
    f = report_fields("Heart size normal. Lungs clear.\nNo effusion.")
    assert f["findings"] == "Heart size normal. Lungs clear. No effusion."
    assert f["impression"] is None and f["indication"] is None


def test_title_case_known_headers_and_sentence_colons():
    text = "Indication: Chest pain.\nFindings:\nLungs: clear.\nHeart: normal size.\nImpression: Normal chest."
    f = report_fields(text)
    assert f["indication"] == "Chest pain."
    assert f["findings"] == "Lungs: clear. Heart: normal size."  # "Lungs:" starts a line but is no section
    assert f["impression"] == "Normal chest."
