"""`data check` and the on_bad_record policy on a manifest with one of each kind of problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clinicalblip.cli import main
from clinicalblip.data.check import (BadRecordsError, apply_bad_record_policy, check_manifest, find_bad_records)
from clinicalblip.data.manifest import read_manifest
from clinicalblip.errors import UserError


def rec(rid, patient, split="train", images=("ok.png",), findings="Lungs clear.", **kw):
    return {"id": rid, "patient_id": patient, "split": split,
            "images": [{"path": p, "view": "PA"} for p in images], "indication": None, "history": None,
            "comparison": None, "findings": findings, "impression": None, **kw}


BAD = {"corrupt", "missing", "empty", "dup", "leak-train", "leak-test"}


@pytest.fixture
def manifest(tmp_path):
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [
        rec("good-1", "p1"),
        rec("good-2", "p2", split="val", findings=None, impression="No acute disease."),
        rec("good-3", "p3", split="test"),
        rec("corrupt", "p4", images=("broken.png",)),
        rec("missing", "p5", images=("ok.png", "gone.png")),
        rec("empty", "p6", findings="  ", impression=None),
        rec("dup", "p7"),
        rec("dup", "p8", split="train"),
        rec("leak-train", "p9", split="train"),
        rec("leak-test", "p9", split="test"),
        rec("unlabelled", "p10", split=None, findings=None),  # generation-only record: no report needed
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_check_reports_each_problem_by_id_and_exits_1(manifest, capsys):
    assert main(["data", "check", str(manifest), "--max-ids", "10", "--json", str(manifest.parent / "c.json")]) == 1
    out = capsys.readouterr().out
    lines = {ln.split()[1]: ln for ln in out.splitlines()[1:]}
    assert "4 usable, 7 unusable" in out.splitlines()[0]
    assert "corrupt" in lines["unreadable_image"] and "missing" in lines["missing_image"]
    assert "gone.png" in lines["missing_image"]
    assert "empty" in lines["empty_report"] and "good-2" not in lines["empty_report"]
    assert lines["duplicate_id"].split()[2] == "2" and "dup" in lines["duplicate_id"]
    assert "leak-train" in lines["patient_in_two_splits"] and "leak-test" in lines["patient_in_two_splits"]
    summary = json.loads((manifest.parent / "c.json").read_text())
    assert summary["unusable"] == 7 and summary["problems"]["missing_image"]["ids"] == ["missing"]


def test_find_bad_records_and_skip_policy(manifest):
    records = read_manifest(manifest)
    bad = find_bad_records(records)
    assert set(bad) == BAD
    assert any(p.startswith("unreadable_image") for p in bad["corrupt"])
    logged = []
    kept = apply_bad_record_policy(records, "skip", log=logged.append)
    assert [r["id"] for r in kept] == ["good-1", "good-2", "good-3", "unlabelled"]
    assert len(logged) == 1 and "dropping 7 of 11 records" in logged[0]
    for rid in BAD:
        assert rid in logged[0]
    with pytest.raises(BadRecordsError, match="7 of 11 records are unusable") as err:
        apply_bad_record_policy(records, "error")
    assert isinstance(err.value, UserError) and "corrupt (unreadable_image)" in str(err.value)
    with pytest.raises(UserError, match="on_bad_record"):
        apply_bad_record_policy(records, "ignore")
    # images only checked for existence: the corrupt file passes, the missing one does not
    assert set(find_bad_records(records, check_images="exists")) == BAD - {"corrupt"}
    assert set(find_bad_records(records, check_images=False)) == BAD - {"corrupt", "missing"}
    good = apply_bad_record_policy(kept, "error")
    assert len(good) == 4


def test_unreadable_lines_and_encoding(tmp_path, capsys):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(rec("a", "p1")).encode(), b"{not json", json.dumps(rec("b", "p2")).encode().replace(b"clear", b"cl\xffear"),
             json.dumps(rec("c", "p3", findings="Patient\u00e2\u20ac\u2122s lungs are clear.")).encode("utf-8"),
             json.dumps(rec("d", None, images=())).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = check_manifest(path)
    bad = report.bad()
    assert set(bad) == {"line 2", "b", "c", "d"}
    assert bad["line 2"][0].startswith("bad_json") and bad["b"][0].startswith("not_utf8")
    assert bad["c"][0].startswith("encoding") and bad["d"] == ["no_images"]
    assert "no_patient_id" in report.ids_by_code() and not report.ok


def test_clean_manifest_exits_0(tmp_path, capsys):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rec("a", "p1")) + "\n" + json.dumps(rec("b", "p2", split="test")) + "\n")
    assert main(["data", "check", str(path)]) == 0
    assert "2 usable, 0 unusable" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
