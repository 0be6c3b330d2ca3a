"""Generation: splits, resume, sharding across processes, templates, the Python API, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinicalblip.data.manifest import read_manifest
from clinicalblip.errors import UserError
from clinicalblip.generate import ReportModel, generate_single, generate_split
from clinicalblip.prompts import TemplateError

from conftest import tiny_stage_cfg

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_interrupted_run_resumes_without_duplicates(stage2_dir, synth_manifest, tmp_path):
    out = tmp_path / "preds.jsonl"
    test_ids = [r["id"] for r in read_manifest(synth_manifest, split="test")]
    generate_split(str(stage2_dir), str(synth_manifest), "test", str(out), max_new_tokens=6, limit=2)
    first = _rows(out)
    assert [r["id"] for r in first] == sorted(test_ids[:2]) or {r["id"] for r in first} == set(test_ids[:2])
    with open(out, "a") as fh:  # a crash mid-write leaves a cut line behind
        fh.write('{"id": "' + test_ids[2] + '", "predic')
    generate_split(str(stage2_dir), str(synth_manifest), "test", str(out), max_new_tokens=6)
    ids = [r["id"] for r in _rows_tolerant(out)]
    assert sorted(ids) == sorted(test_ids)  # every id exactly once, the cut one regenerated
    assert {r["id"]: r["prediction"] for r in first}.items() <= {r["id"]: r["prediction"] for r in _rows_tolerant(out)}.items()
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["template"] == "findings_with_context" and meta["decoding"]["num_beams"] == 1
    assert meta["model_hash"] and meta["code_version"]


def _rows_tolerant(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


@pytest.mark.parametrize("context", ["none", "generic", "shuffled", "blank_image"])
def test_context_ablations_change_the_prompt_or_image(stage2_dir, synth_manifest, tmp_path, context):
    out = tmp_path / f"{context}.jsonl"
    generate_split(str(stage2_dir), str(synth_manifest), "test", str(out), context=context, max_new_tokens=4)
    rows = {r["id"]: r for r in _rows(out)}
    recs = {r["id"]: r for r in read_manifest(synth_manifest, split="test")}
    for rid, row in rows.items():
        ind = recs[rid]["indication"]
        if context == "none":
            assert "Indication:" not in row["prompt"]
        elif context == "generic":
            assert row["prompt"].startswith("Indication: Routine chest radiograph.")
        elif context == "blank_image" and ind:
            assert row["prompt"].startswith(f"Indication: {' '.join(ind.split())}")
    if context == "shuffled":
        own = sum(1 for rid, row in rows.items() if recs[rid]["indication"]
                  and row["prompt"].startswith(f"Indication: {recs[rid]['indication']}"))
        assert own < len(rows)


def test_two_process_generation_yields_one_prediction_per_id(stage2_dir, synth_manifest, tmp_path):
    out = tmp_path / "preds.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "clinicalblip", "generate",
           str(stage2_dir), "--manifest", str(synth_manifest), "--split", "test", "--out", str(out),
           "--max-new-tokens", "4", "--batch-size", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [r["id"] for r in _rows(out)]
    test_ids = [r["id"] for r in read_manifest(synth_manifest, split="test")]
    assert sorted(ids) == sorted(test_ids)
    assert not list(tmp_path.glob("preds.jsonl.part*"))  # parts folded in and removed
    assert json.loads(Path(str(out) + ".meta.json").read_text())["num_processes"] == 2


def test_stage_template_is_the_default(synth_manifest, stage1_dir, tmp_path):
    from clinicalblip.train import train_stage

    s = tmp_path / "nocontext"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, s, parent=stage1_dir,
                               **{"data.template": "findings_no_context", "train.max_steps": 1}))
    rec = read_manifest(synth_manifest, split="test")[0]
    imgs = [im["path"] for im in rec["images"]]
    out = generate_single(str(s), images=imgs, indication="Chest pain.", max_new_tokens=3)
    assert out["template"] == "findings_no_context" and "Indication" not in out["prompt"]
    out = generate_single(str(s), images=imgs, indication="Chest pain.", max_new_tokens=3,
                          template="findings_with_context")
    assert out["prompt"].startswith("Indication: Chest pain.")


def test_python_api_loads_once_and_reports(stage2_dir, synth_manifest):
    rm = ReportModel.load(str(stage2_dir))
    rec = read_manifest(synth_manifest, split="test")[0]
    a = rm.report([im["path"] for im in rec["images"]], indication="Fever and productive cough.", max_new_tokens=5)
    b = rm.report([im["path"] for im in rec["images"]], indication="Fever and productive cough.", max_new_tokens=5)
    assert a == b and a["prompt"].startswith("Indication: Fever and productive cough.")


def test_errors_name_what_is_available(stage2_dir, synth_manifest, tmp_path):
    rec = read_manifest(synth_manifest, split="test")[0]
    imgs = [im["path"] for im in rec["images"]]
    with pytest.raises(TemplateError, match="available: .*findings_with_context"):
        generate_single(str(stage2_dir), images=imgs, template="no_such_template")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot decode image .*bad.png"):
        generate_single(str(stage2_dir), images=[str(bad)])
    with pytest.raises(UserError, match="unknown context mode 'sideways'"):
        generate_split(str(stage2_dir), str(synth_manifest), "test", str(tmp_path / "p.jsonl"), context="sideways")
    with pytest.raises(UserError, match="no records in split 'nope'"):
        generate_split(str(stage2_dir), str(synth_manifest), "nope", str(tmp_path / "p.jsonl"))
