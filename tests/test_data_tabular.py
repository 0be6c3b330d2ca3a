"""A hospital's own CSV / JSONL export with a column mapping."""

from __future__ import annotations

import csv
import json

import pytest

from clinicalblip.cli import main
from clinicalblip.data.manifest import read_manifest
from clinicalblip.data.prepare import PrepareError
from clinicalblip.data.tabular import parse_mapping, prepare_table


def test_csv_with_mapping(tmp_path, capsys):
    path = tmp_path / "export.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["accession", "mrn", "set", "frontal", "lateral", "report_text", "reason", "extra"])
        w.writerow(["A1", "M1", "training", "img/a1_f.png", "img/a1_l.png", "Lungs clear.", "Cough", "x"])
        w.writerow(["A2", "M2", "validation", "img/a2_f.png", "", "Small effusion.", "None.", "y"])
        w.writerow(["A3", "M3", "", "/abs/a3.dcm", "", "", "XXXX", "z"])
    out = tmp_path / "m" / "manifest.jsonl"
    code = main(["data", "prepare", "csv", str(path), "--map", "id=accession", "--map", "patient_id=mrn",
                 "--map", "split=set", "--map", "images=frontal,lateral", "--map", "findings=report_text",
                 "--map", "indication=reason", "--split", "test", "--out", str(out)])
    assert code == 0
    assert "wrote 3 studies (train 1, val 1, test 1)" in capsys.readouterr().out
    recs = {r["id"]: r for r in read_manifest(out, resolve_paths=False)}
    a1 = recs["A1"]
    assert a1["patient_id"] == "M1" and a1["split"] == "train" and a1["findings"] == "Lungs clear."
    assert [im["path"] for im in a1["images"]] == ["../img/a1_f.png", "../img/a1_l.png"]
    assert recs["A2"]["indication"] is None and recs["A2"]["split"] == "val" and len(recs["A2"]["images"]) == 1
    a3 = recs["A3"]
    assert a3["split"] == "test" and a3["images"][0]["path"] == "/abs/a3.dcm" and a3["findings"] is None
    assert "extra" not in a3


def test_jsonl_report_sections_views_and_kept_columns(tmp_path):
    path = tmp_path / "export.jsonl"
    rows = [
        {"id": 1, "patient": "P1", "split": "test", "images": [{"path": "a.png", "view": "pa"}, "b.png"],
         "report": "INDICATION: Fever.\nFINDINGS: Right lower lobe opacity.\nIMPRESSION: Pneumonia.",
         "site": "north"},
        {"id": 2, "patient": "P2", "split": "test", "image_path": "c.png;d.png", "views": "AP|LL",
         "report": "No acute disease.", "findings": "Explicit findings.", "site": "south"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "m.jsonl"
    prepare_table(path, out, fmt="jsonl", images=tmp_path / "imgs", keep_columns=True,
                  mapping=parse_mapping(["patient_id=patient", "images=images,image_path", "report=report"]))
    recs = {r["id"]: r for r in read_manifest(out, resolve_paths=False)}
    r1 = recs["1"]
    assert (r1["indication"], r1["findings"], r1["impression"]) == ("Fever.", "Right lower lobe opacity.", "Pneumonia.")
    assert r1["images"] == [{"path": "imgs/a.png", "view": "PA"}, {"path": "imgs/b.png", "view": None}]
    assert r1["site"] == "north"
    r2 = recs["2"]
    assert r2["findings"] == "Explicit findings."  # the mapped column wins over the parsed report
    assert [im["view"] for im in r2["images"]] == ["AP", "LATERAL"]


def test_mapping_errors(tmp_path):
    with pytest.raises(PrepareError, match="unknown target"):
        parse_mapping(["finding=report"])
    with pytest.raises(PrepareError, match="TARGET=COLUMN"):
        parse_mapping(["findings"])
    path = tmp_path / "x.csv"
    path.write_text("accession,text\nA1,hello\n")
    with pytest.raises(PrepareError, match="no 'id' column"):
        prepare_table(path, tmp_path / "m.jsonl", fmt="csv")
    with pytest.raises(PrepareError, match="column\\(s\\) nope not found"):
        prepare_table(path, tmp_path / "m.jsonl", fmt="csv", mapping=parse_mapping(["id=accession", "findings=nope"]))
    path.write_bytes("id,findings\nA1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(PrepareError, match="--encoding"):
        prepare_table(path, tmp_path / "m.jsonl", fmt="csv")
    prepare_table(path, tmp_path / "m.jsonl", fmt="csv", encoding="latin-1")
    assert read_manifest(tmp_path / "m.jsonl")[0]["findings"] == "caf\xe9"
