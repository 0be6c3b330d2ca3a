"""IU X-Ray prepare: small files in the public formats, and the acceptance run on the shared dev half."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.cli import main
from clinicalblip.data.iu_xray import prepare_iu_xray
from clinicalblip.data.manifest import read_manifest

SHARED = Path(__file__).resolve().parents[2] / "shared"
IU_DEV = SHARED / "data" / "iu_xray_dev"


def write_rows(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def build_small(d: Path) -> Path:
    ann = {
        "train": [{"id": "CXR10_IM-0001", "report": "The lungs are clear.", "split": "train",
                   "image_path": ["CXR10_IM-0001/0.png", "CXR10_IM-0001/1.png"]},
                  {"id": "CXR12_IM-0003", "report": "Heart size normal. XXXX scarring.", "split": "train",
                   "image_path": ["CXR12_IM-0003/0.png", "CXR12_IM-0003/1.png"]}],
        "val": [{"id": "CXR14_IM-0005", "report": "No effusion.", "split": "val",
                 "image_path": ["CXR14_IM-0005/0.png", "CXR14_IM-0005/1.png"]}],
        "test": [{"id": "CXR16_IM-0007", "report": "Clear.", "split": "test",
                  "image_path": ["CXR16_IM-0007/0.png", "CXR16_IM-0007/1.png"]}],
    }
    (d / "annotation.json").write_text(json.dumps(ann))
    write_rows(d / "reports.csv", ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings",
                                   "impression"], [
        ["10", "normal", "normal", "PA and lateral", "Chest pain.", "None.", "The lungs are clear.", "Normal."],
        ["12", "Cicatrix", "Cicatrix", "x", "XXXX-year-old  male\nwith cough", "XXXX, XXXX", "x", "1. Scarring."],
        ["14", "normal", "normal", "x", "XXXX", "", "No effusion.", "Negative."],
        ["16", "normal", "normal", "x", "", "", "Clear.", "Negative."],
    ])
    write_rows(d / "projections.csv", ["uid", "filename", "projection"], [
        ["10", "10_IM-0001-1001.dcm.png", "Frontal"], ["10", "10_IM-0001-2001.dcm.png", "Lateral"],
        # three files, R2Gen kept two: one frontal, one lateral
        ["12", "12_IM-0003-1001.dcm.png", "Frontal"], ["12", "12_IM-0003-2001.dcm.png", "Frontal"],
        ["12", "12_IM-0003-3001.dcm.png", "Lateral"],
        ["14", "14_IM-0005-1001.dcm.png", "Lateral"], ["14", "14_IM-0005-2001.dcm.png", "Lateral"],
        ["16", "16_IM-0007-1001.dcm.png", "Frontal"], ["16", "16_IM-0007-2001.dcm.png", "Lateral"],
    ])
    return d


def test_small_iu_prepare(tmp_path):
    d = build_small(tmp_path)
    out = tmp_path / "out" / "manifest.jsonl"
    s = prepare_iu_xray(d / "annotation.json", out, reports=d / "reports.csv", projections=d / "projections.csv")
    assert s["studies"] == 4 and s["splits"] == {"train": 2, "val": 1, "test": 1}
    recs = {r["id"]: r for r in read_manifest(out, resolve_paths=False)}
    r = recs["CXR10_IM-0001"]
    assert r["patient_id"] == "10" and r["split"] == "train"
    assert r["indication"] == "Chest pain." and r["comparison"] is None and r["impression"] == "Normal."
    assert r["findings"] == "The lungs are clear."
    assert r["images"] == [{"path": "../images/CXR10_IM-0001/0.png", "view": "FRONTAL"},
                           {"path": "../images/CXR10_IM-0001/1.png", "view": "LATERAL"}]
    r = recs["CXR12_IM-0003"]
    assert r["indication"] == "XXXX-year-old male with cough"  # faithful; whitespace collapsed
    assert r["findings"] == "Heart size normal. XXXX scarring."  # the annotation's report, not the CSV's
    assert [im["view"] for im in r["images"]] == ["FRONTAL", "LATERAL"]
    assert r["mesh"] == "Cicatrix"
    assert [im["view"] for im in recs["CXR14_IM-0005"]["images"]] == ["LATERAL", "LATERAL"]
    assert recs["CXR16_IM-0007"]["indication"] is None
    assert s["with_indication"] == 3 and s["with_informative_indication"] == 2


def test_openi_image_layout_uses_every_projection_file(tmp_path):
    d = build_small(tmp_path)
    imgs = tmp_path / "images_normalized"
    imgs.mkdir()
    for name in ["10_IM-0001-1001.dcm.png", "10_IM-0001-2001.dcm.png"]:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(imgs / name)
    out = tmp_path / "m.jsonl"
    s = prepare_iu_xray(d / "annotation.json", out, reports=d / "reports.csv", projections=d / "projections.csv",
                        images=imgs)
    assert s["image_layout"] == "openi"
    recs = {r["id"]: r for r in read_manifest(out)}
    assert [Path(im["path"]).name for im in recs["CXR12_IM-0003"]["images"]] == [
        "12_IM-0003-1001.dcm.png", "12_IM-0003-2001.dcm.png", "12_IM-0003-3001.dcm.png"]
    assert Path(recs["CXR10_IM-0001"]["images"][0]["path"]).is_file()


def test_annotation_only_and_bad_inputs(tmp_path, capsys):
    d = build_small(tmp_path)
    out = tmp_path / "m.jsonl"
    assert main(["data", "prepare", "iu-xray", "--annotation", str(d / "annotation.json"), "--out", str(out)]) == 0
    assert "no --reports/--projections" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["data", "prepare", "iu-xray", "--annotation", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "R2Gen format" in capsys.readouterr().err
    write_rows(tmp_path / "r.csv", ["uid", "text"], [["10", "x"]])
    assert main(["data", "prepare", "iu-xray", "--annotation", str(d / "annotation.json"), "--reports",
                 str(tmp_path / "r.csv"), "--out", str(out)]) == 2
    assert "missing column(s) indication" in capsys.readouterr().err


@pytest.mark.skipif(not IU_DEV.is_dir(), reason="IU X-Ray dev files (../shared) not present")
def test_acceptance_on_iu_dev(tmp_path, capsys):
    out = tmp_path / "manifest.jsonl"
    code = main(["data", "prepare", "iu-xray", "--annotation", str(IU_DEV / "annotation.json"),
                 "--reports", str(IU_DEV / "indiana_reports_dev.csv"),
                 "--projections", str(IU_DEV / "indiana_projections_dev.csv"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "indication" in printed
    ann = json.loads((IU_DEV / "annotation.json").read_text())
    expected = {e["id"]: (split, e["report"]) for split, entries in ann.items() for e in entries}
    recs = read_manifest(out, resolve_paths=False)
    assert len(recs) == len(expected) and len({r["id"] for r in recs}) == len(expected)
    for r in recs:
        split, report = expected[r["id"]]
        assert r["split"] == split and r["findings"] == report
        assert r["patient_id"] == re.match(r"CXR(\d+)_", r["id"]).group(1)
        assert len(r["images"]) == 2
        assert all(im["view"] in ("FRONTAL", "LATERAL") for im in r["images"])
    with_ind = sum(1 for r in recs if r["indication"])
    assert with_ind / len(recs) >= 0.95
    both = sum(1 for r in recs if {im["view"] for im in r["images"]} == {"FRONTAL", "LATERAL"})
    assert both / len(recs) > 0.99
    # one study per patient, so nothing leaks across splits; the check (without images) passes
    assert main(["data", "check", str(out), "--images", "none"]) == 0
