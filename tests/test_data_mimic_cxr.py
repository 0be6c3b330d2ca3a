"""MIMIC-CXR prepare on small files in the exact official layout (and R2Gen's annotation format)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.cli import main
from clinicalblip.data.manifest import read_manifest
from clinicalblip.data.mimic_cxr import prepare_mimic_cxr

REPORTS = {
    # study: (subject, split, report text, [(dicom_id, ViewPosition)])
    "50000001": ("10000001", "train", """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough  // ?pna
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 Lungs are clear.  No effusion.
 
 IMPRESSION: 
 
 No acute process.
""", [("d1a", "LATERAL"), ("d1b", "PA")]),
    "50000002": ("10000001", "train", """                                 FINAL REPORT
 REASON FOR EXAMINATION:  Shortness of breath.
 
 CLINICAL INFORMATION:  ___-year-old man with CHF.
 
 COMPARISONS:  ___.
 
 PORTABLE AP CHEST:  Mild pulmonary edema.
 
 CONCLUSION:  Mild edema.
""", [("d2a", "AP")]),
    "50000003": ("11000002", "validate", """ HISTORY:  Line placement.
 
 FINDINGS:  Right PICC tip in the SVC.
""", [("d3a", "AP"), ("d3b", "LL"), ("d3c", ""), ("d3d", "PA")]),
    "50000004": ("12000003", "test", """ INDICATION:  Fall.
 
 TECHNIQUE:  Portable.
 Frontal radiograph obtained.
 
 No fracture.  Lungs clear.
""", [("d4a", "AP"), ("d4b", "LATERAL"), ("d4c", "SWIMMERS")]),
}


def write_csv(path: Path, header, rows, gz=False):
    opener = (lambda: gzip.open(path, "wt", newline="")) if gz else (lambda: open(path, "w", newline=""))
    with opener() as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def build_official(root: Path, image_ext="jpg", gz=True, with_images=True) -> Path:
    split_rows, meta_rows, chex_rows = [], [], []
    sfx = ".gz" if gz else ""
    for study, (subject, split, text, dicoms) in REPORTS.items():
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{study}.txt").write_text(text)
        for dicom, view in dicoms:
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 64, 64, 21800506, 213014.531,
                              "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            if with_images:
                (folder / f"s{study}").mkdir(exist_ok=True)
                Image.fromarray(np.full((8, 8), 100, np.uint8)).save(folder / f"s{study}" / f"{dicom}.{image_ext}"
                                                                     ) if image_ext == "jpg" else None
        chex_rows.append([subject, study] + ["1.0" if study == "50000002" else "", "", "", "", "", "", "", "", "",
                                             "-1.0" if study == "50000002" else "", "", "", "", "0.0"])
    write_csv(root / f"mimic-cxr-2.0.0-split.csv{sfx}", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz)
    write_csv(root / f"mimic-cxr-2.0.0-metadata.csv{sfx}",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta_rows, gz)
    write_csv(root / f"mimic-cxr-2.0.0-chexpert.csv{sfx}",
              ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
               "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
               "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"], chex_rows, gz)
    return root


def test_official_layout_sections_views_splits_labels(tmp_path):
    root = build_official(tmp_path / "mimic-cxr-jpg")
    out = tmp_path / "out" / "manifest.jsonl"
    s = prepare_mimic_cxr(out, root=root)
    assert s["studies"] == 4 and s["splits"] == {"train": 2, "val": 1, "test": 1}
    assert s["images_per_study"] == {1: 1, 2: 1, 3: 1, 4: 1}
    recs = {r["id"]: r for r in read_manifest(out)}
    r1 = recs["s50000001"]
    assert r1["patient_id"] == "p10000001" and r1["split"] == "train"
    assert r1["indication"] == "___F with cough // ?pna"
    assert r1["comparison"] is None  # "None." means absent
    assert r1["findings"] == "Lungs are clear. No effusion." and r1["impression"] == "No acute process."
    assert [im["view"] for im in r1["images"]] == ["PA", "LATERAL"]  # frontal first
    assert all(Path(im["path"]).is_file() for im in r1["images"])  # resolved against the manifest folder
    r2 = recs["s50000002"]
    assert (r2["indication"], r2["history"], r2["comparison"]) == (
        "Shortness of breath.", "___-year-old man with CHF.", "___.")
    assert r2["findings"] == "Mild pulmonary edema." and r2["impression"] == "Mild edema."
    assert r2["chexpert"] == {"Atelectasis": 1, "Pleural Effusion": -1, "Support Devices": 0}
    r3 = recs["s50000003"]
    assert r3["split"] == "val" and r3["history"] == "Line placement."
    assert [im["view"] for im in r3["images"]] == ["AP", "PA", "LATERAL", None]
    r4 = recs["s50000004"]
    assert r4["impression"] == "No fracture. Lungs clear." and r4["findings"] is None  # last paragraph
    assert [im["view"] for im in r4["images"]] == ["AP", "LATERAL", "SWIMMERS"]
    # the manifest stores paths relative to its folder
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["images"][0]["path"].startswith("../mimic-cxr-jpg/files/p10/p10000001/s50000001/")


def test_official_layout_dicom_images_and_explicit_paths(tmp_path):
    pydicom = pytest.importorskip("pydicom")  # noqa: F841
    root = build_official(tmp_path / "mimic-cxr", image_ext="dcm", gz=False, with_images=False)
    # Only one DICOM file on disk is enough for the extension to be detected.
    (root / "files/p10/p10000001/s50000001").mkdir(parents=True)
    (root / "files/p10/p10000001/s50000001/d1a.dcm").write_bytes(b"")
    out = tmp_path / "m.jsonl"
    prepare_mimic_cxr(out, split_csv=root / "mimic-cxr-2.0.0-split.csv", metadata=root / "mimic-cxr-2.0.0-metadata.csv",
                      reports=root, images=root / "files")
    recs = read_manifest(out)
    assert all(im["path"].endswith(".dcm") for r in recs for im in r["images"])
    assert "chexpert" not in recs[0]


def test_r2gen_annotation_grouped_by_study(tmp_path):
    root = build_official(tmp_path / "mimic")
    ann = {"train": [], "val": [], "test": []}
    for study, (subject, split, _, dicoms) in REPORTS.items():
        key = {"validate": "val"}.get(split, split)
        for dicom, _ in dicoms:  # R2Gen: one entry per image, report = findings
            ann[key].append({"id": dicom, "study_id": int(study), "subject_id": int(subject),
                             "report": f"findings of {study}", "image_path": [
                                 f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"], "split": key})
    (tmp_path / "r2gen").mkdir()
    (tmp_path / "r2gen/annotation.json").write_text(json.dumps(ann))
    out = tmp_path / "m.jsonl"
    code = main(["data", "prepare", "mimic-cxr", "--annotation", str(tmp_path / "r2gen/annotation.json"),
                 "--root", str(root), "--out", str(out)])
    assert code == 0
    recs = {r["id"]: r for r in read_manifest(out)}
    assert len(recs) == 4
    r3 = recs["s50000003"]
    assert r3["findings"] == "findings of 50000003"  # R2Gen's report, verbatim
    assert r3["history"] == "Line placement."  # other sections from the report file
    assert len(r3["images"]) == 4 and r3["images"][0]["view"] in ("AP", "PA")
    assert r3["images"][0]["path"].startswith(str((tmp_path / "r2gen/images").resolve()))
    # without any report files / CSVs only the annotation is used
    out2 = tmp_path / "m2.jsonl"
    assert main(["data", "prepare", "mimic-cxr", "--annotation", str(tmp_path / "r2gen/annotation.json"),
                 "--out", str(out2)]) == 0
    r = {x["id"]: x for x in read_manifest(out2)}["s50000001"]
    assert r["indication"] is None and r["findings"] == "findings of 50000001" and r["images"][0]["view"] is None


def test_missing_inputs_are_user_errors(tmp_path, capsys):
    assert main(["data", "prepare", "mimic-cxr", "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "needs --annotation" in capsys.readouterr().err
    assert main(["data", "prepare", "mimic-cxr", "--split-csv", str(tmp_path / "nope.csv"),
                 "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
