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
                               **{"data.template": "findings_no_context", "data.prior": "images", "train.max_steps": 1}))
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


def test_rerun_with_other_settings_refuses_naming_the_difference(stage1_dir, stage2_dir, synth_manifest, tmp_path):
    out = tmp_path / "preds.jsonl"
    m, s2 = str(synth_manifest), str(stage2_dir)
    generate_split(s2, m, "test", str(out), max_new_tokens=4, limit=2)
    before = out.read_text()
    key = json.loads(Path(str(out) + ".meta.json").read_text())["provenance"]
    assert {r["provenance"] for r in _rows(out)} == {key}
    cases = [
        (dict(context="none"), r"context: 'real' -> 'none'"),
        (dict(template="findings_no_context"), r"template: 'findings_with_context' -> 'findings_no_context'"),
        (dict(num_beams=2), r"decoding: .*'num_beams': 1.* -> .*'num_beams': 2"),
        (dict(dtype="bf16"), r"dtype: 'fp32' -> 'bf16'"),
        (dict(model=str(stage1_dir)), r"model_hash: '\w+' -> '\w+'"),
        (dict(split="val"), r"split: 'test' -> 'val'"),
    ]
    for change, needle in cases:
        kw = dict(max_new_tokens=4, limit=2)
        model = change.pop("model", s2)
        split = change.pop("split", "test")
        kw.update(change)
        with pytest.raises(UserError, match=f"{out.name} was generated with other settings \\(.*{needle}.*--overwrite"):
            generate_split(model, m, split, str(out), **kw)
        assert out.read_text() == before  # nothing appended, meta untouched
    assert json.loads(Path(str(out) + ".meta.json").read_text())["context"] == "real"
    # a different manifest (same path, edited content) is another data set
    edited = tmp_path / "manifest.jsonl"
    edited.write_text(synth_manifest.read_text().replace("Routine", "routine"))
    for img in synth_manifest.parent.glob("images"):
        (tmp_path / "images").symlink_to(img)
    with pytest.raises(UserError, match="manifest_hash"):
        generate_split(s2, str(edited), "test", str(out), max_new_tokens=4, limit=2)
    # --overwrite starts over with the new settings: every row is a no-indication row
    generate_split(s2, m, "test", str(out), max_new_tokens=4, context="none", overwrite=True)
    rows = _rows(out)
    assert len(rows) == len(read_manifest(synth_manifest, split="test"))
    assert all("Indication:" not in r["prompt"] for r in rows)
    assert json.loads(Path(str(out) + ".meta.json").read_text())["context"] == "none"
    # rows without their meta file are of unknown origin
    Path(str(out) + ".meta.json").unlink()
    with pytest.raises(UserError, match="preds.jsonl already holds predictions but preds.jsonl.meta.json is missing"):
        generate_split(s2, m, "test", str(out), max_new_tokens=4, context="none")


def test_blank_image_ablation_feeds_blank_pixels(stage2_dir, synth_manifest, tmp_path, monkeypatch):
    seen = []
    real = ReportModel.generate_batch

    def spy(self, batch, **kw):
        seen.append(batch["pixel_values"].clone())
        return real(self, batch, **kw)

    monkeypatch.setattr(ReportModel, "generate_batch", spy)
    generate_split(str(stage2_dir), str(synth_manifest), "test", str(tmp_path / "real.jsonl"), max_new_tokens=2)
    generate_split(str(stage2_dir), str(synth_manifest), "test", str(tmp_path / "blank.jsonl"), max_new_tokens=2,
                   context="blank_image")
    n_real = len(seen) // 2
    real_px, blank_px = seen[:n_real], seen[n_real:]
    for px in blank_px:
        flat = px.flatten(2)  # (views, channels, pixels): each channel of each view one value
        assert (flat.amax(-1) == flat.amin(-1)).all()
        assert (flat[:, :, 0] == blank_px[0].flatten(2)[0, :, 0]).all()  # the same gray everywhere
    assert all(px.flatten(2).std(-1).max() > 0.05 for px in real_px)  # the real images are not blank
    assert sum(p.shape[0] for p in blank_px) == sum(p.shape[0] for p in real_px)  # one blank per view


def test_shortened_prompts_are_counted_in_the_meta_file(stage2_dir, synth_manifest, tmp_path):
    recs = read_manifest(synth_manifest, split="test")
    manifest = tmp_path / "m.jsonl"
    rows = []
    for i, r in enumerate(recs[:3]):
        r = dict(r, images=[dict(im, path=str(Path(synth_manifest).parent / im["path"])) for im in r["images"]])
        if i == 0:
            r["history"] = " ".join(["breathless"] * 400)
        rows.append(json.dumps(r))
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "p.jsonl"
    generate_split(str(stage2_dir), str(manifest), "test", str(out), max_new_tokens=2)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["prompts_shortened"] == 1 and meta["studies"] == 3 and meta["max_prompt_tokens"] == 256
    long_row = next(r for r in _rows(out) if r["id"] == recs[0]["id"])
    assert long_row["prompt"].endswith("Write the findings of this chest radiograph.")
    assert 0 < long_row["prompt"].count("breathless") < 400


def test_single_study_honours_or_refuses_every_flag(stage2_dir, synth_manifest, tmp_path, capsys):
    from clinicalblip import cli

    rec = next(r for r in read_manifest(synth_manifest, split="test") if len(r["images"]) == 2)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(dict(rec, images=[dict(im, path=str(im["path"])) for im in rec["images"]])) + "\n")
    split_out = tmp_path / "split.jsonl"
    generate_split(str(stage2_dir), str(one), "test", str(split_out), max_new_tokens=8)
    split_row = _rows(split_out)[0]
    imgs = [im["path"] for im in rec["images"]]
    views = [im["view"] for im in rec["images"]]
    single = generate_single(str(stage2_dir), images=imgs, views=views, indication=rec.get("indication"),
                             history=rec.get("history"), comparison=rec.get("comparison"), max_new_tokens=8)
    # same default dtype in both modes -> the same prompt gives the same text
    assert single["dtype"] == json.loads(Path(str(split_out) + ".meta.json").read_text())["dtype"]
    assert single["prompt"] == split_row["prompt"] and single["report"] == split_row["prediction"]
    assert generate_single(str(stage2_dir), images=imgs, dtype="bf16", max_new_tokens=2)["dtype"] == "bf16"
    none = generate_single(str(stage2_dir), images=imgs, indication="Chest pain.", context="none", max_new_tokens=2)
    assert "Indication" not in none["prompt"] and none["context"] == "none"

    out = tmp_path / "study.json"
    args = ["generate", str(stage2_dir), *sum((["--image", p] for p in imgs), []), "--max-new-tokens", "3"]
    assert cli.main(args + ["--indication", "Chest pain.", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["prompt"].startswith("Indication: Chest pain.") and written["report"] == capsys.readouterr().out.strip()
    for flag in (["--batch-size", "4"], ["--limit", "2"], ["--split", "val"], ["--overwrite"]):
        assert cli.main(args + flag) == 2
        assert f"{flag[0]} cannot be used with --image (one study)" in capsys.readouterr().err
    assert cli.main(args + ["--context", "shuffled"]) == 2
    assert "--context shuffled gives each study another study's indication" in capsys.readouterr().err
    assert cli.main(["generate", str(stage2_dir), "--manifest", str(one), "--out", str(tmp_path / "x.jsonl"),
                     "--indication", "Chest pain."]) == 2
    assert "--indication cannot be used with --manifest" in capsys.readouterr().err
