"""Issue 24, items 1-6: paths a user's own data takes that used to go wrong without a word.

Each test feeds the case and asserts the right result or a one-line error naming the record, key or file:
report truncation (no EOS after a cut, counted in the run header and `data check`), LoRA targets that match
nothing, foreign metrics in the model card, the final weights' val loss, records without a target, and the
record check / duplicate rule of `generate --manifest`, `eval` and `compare`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clinicalblip.data.collate import IGNORE_INDEX, StudyCollator
from clinicalblip.errors import UserError
from clinicalblip.prompts import load_template
from clinicalblip.tiny import build_tiny_model, build_tiny_processor

from conftest import tiny_stage_cfg

CORPUS = ["The heart is normal in size.", "The lungs are clear.", "Chest pain.", "Fever and cough."]
LONG = " ".join(["The heart is normal in size. The lungs are clear."] * 6)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_line_error(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- 1: truncation
@pytest.mark.parametrize("preset", ["tiny", "tiny-t5"])
def test_a_cut_report_has_no_eos_and_an_uncut_one_has(preset, tmp_path):
    proc = build_tiny_processor(preset, corpus=CORPUS)
    img = tmp_path / "a.png"
    Image.new("L", (32, 32), 90).save(img)
    recs = [{"id": "long", "images": [{"path": str(img), "view": "PA"}], "findings": LONG},
            {"id": "short", "images": [{"path": str(img), "view": "PA"}], "findings": "The lungs are clear."}]
    decoder_only = preset == "tiny"
    coll = StudyCollator(processor=proc, template=load_template("findings_with_context"),
                         num_query_tokens=proc.num_query_tokens, decoder_only=decoder_only, mode="train",
                         max_report_tokens=8)
    lengths = coll.report_lengths(recs)
    assert lengths[0] > 8 >= lengths[1]
    labels = coll(recs)["labels"]
    eos = proc.tokenizer.eos_token_id
    for row, n, cut in zip(labels.tolist(), lengths, (True, False)):
        supervised = [t for t in row if t != IGNORE_INDEX]
        if cut:
            assert len(supervised) == 8 and supervised[-1] != eos
            assert eos not in supervised
        else:
            assert len(supervised) == n + 1 and supervised[-1] == eos


def test_cut_summary_and_data_check_lengths(tmp_path, capsys):
    from clinicalblip.cli import main
    from clinicalblip.data.reportlen import cut_summary, percentile

    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == 10
    assert percentile([5, 1, 3], 50) == 3
    assert cut_summary([10, 20, 130, 200], 128) == "2 of 4 train reports cut at 128 tokens; p95 length 200, longest 200"
    img = tmp_path / "a.png"
    Image.new("L", (32, 32), 90).save(img)
    rows = [{"id": f"s{i}", "patient_id": f"p{i}", "split": "train", "images": [{"path": "a.png", "view": "PA"}],
             "findings": " ".join(["word"] * (10 * (i + 1))), "impression": "Normal."} for i in range(10)]
    m = _write(tmp_path / "m.jsonl", rows)
    assert main(["data", "check", str(m), "--template", "findings_no_context", "--max-report-tokens", "60"]) == 0
    out = capsys.readouterr().out
    assert "findings length (words, n=10): p50 50  p90 90  p95 100  p99 100  max 100" in out
    assert "limit 60 words (data.max_report_tokens): 4 of 10 (40.0%) are longer" in out


def _long_report_manifest(src: Path, dst: Path, extra: list[dict] = ()) -> list[dict]:
    rows = _rows(src)
    for r in rows:
        if r["split"] == "train":
            r["findings"] = (r["findings"] + " ") * 3
    _write(dst, rows + list(extra))
    return rows


def test_train_header_counts_cut_reports_validates_final_weights_and_logs_skipped_targets(
        synth_manifest, tmp_path, capsys):
    """Items 1, 4, 5 in one short run: the header's cut count, val loss of the last step's weights (max_steps
    ends mid-epoch, eval_every 0), and records without a target skipped with their ids (train AND val)."""
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.train import train_stage

    img = _rows(synth_manifest)[0]["images"]
    empty = [{"id": "no-findings-train", "patient_id": "pX1", "split": "train", "findings": "",
              "impression": "Normal.", "images": img},
             {"id": "no-findings-val", "patient_id": "pX2", "split": "val", "findings": "  ",
              "impression": "Normal.", "images": img}]
    m = synth_manifest.parent / "long_reports.jsonl"  # beside the images (relative paths)
    _long_report_manifest(synth_manifest, m, empty)
    out = tmp_path / "st"
    n_train = sum(1 for r in read_manifest(m) if r["split"] == "train") - 1
    steps_per_epoch = -(-n_train // 4)
    cfg = tiny_stage_cfg("stage1.yaml", m, out, **{"train.max_steps": steps_per_epoch + 2, "train.eval_every": 0,
                                                   "data.max_report_tokens": 12, "data.on_bad_record": "skip",
                                                   "train.log_every": 100})
    train_stage(cfg)
    log = capsys.readouterr().out
    assert "on_bad_record=skip: dropping 2 of" in log
    assert "no-findings-train (empty_target)" in log and "no-findings-val (empty_target)" in log
    assert f"reports: {n_train} of {n_train} train reports cut at 12 tokens; p95 length" in log
    vals = [r for r in _rows(out / "metrics.jsonl") if "val_loss" in r]
    assert [v["step"] for v in vals] == [steps_per_epoch, steps_per_epoch + 2]
    stage = json.loads((out / "stage.json").read_text())
    assert stage["metrics"]["steps"] == steps_per_epoch + 2
    assert stage["metrics"]["val_loss"] == pytest.approx(vals[-1]["val_loss"])
    assert vals[-1]["val_loss"] != pytest.approx(vals[0]["val_loss"])


def test_records_without_the_templates_target_are_refused_under_error(synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    rows = _rows(synth_manifest)
    test_row = next(r for r in rows if r["split"] == "test")
    test_row["findings"] = ""
    m = _write(synth_manifest.parent / "no_target.jsonl", rows)
    with pytest.raises(UserError) as err:
        train_stage(tiny_stage_cfg("stage1.yaml", m, tmp_path / "st"))
    msg = _one_line_error(err.value)
    assert f"{test_row['id']} (empty_target)" in msg and "1 of" in msg


def test_data_check_knows_the_target(synth_manifest, capsys):
    from clinicalblip.cli import main

    rows = _rows(synth_manifest)
    rows[0]["findings"] = ""
    rows[1]["impression"] = ""
    m = _write(synth_manifest.parent / "targets.jsonl", rows)
    # without a template: reported per section, as warnings
    assert main(["data", "check", str(m), "--images", "none"]) == 0
    out = capsys.readouterr().out
    assert "warning no_findings" in out and rows[0]["id"] in out
    assert "warning no_impression" in out and rows[1]["id"] in out
    # with a template: the record that lacks its target is unusable
    assert main(["data", "check", str(m), "--images", "none", "--template", "findings_with_context"]) == 1
    out = capsys.readouterr().out
    assert "1 unusable" in out and "empty_target" in out and rows[0]["id"] in out
    assert main(["data", "check", str(m), "--images", "none", "--template", "impression_no_context"]) == 1
    out = capsys.readouterr().out
    assert "empty_target" in out and rows[1]["id"] in out


# ---------------------------------------------------------------------------------------------- 2: dead LoRA
def test_lora_target_that_matches_nothing_is_refused_naming_the_layers(synth_manifest, tmp_path):
    from clinicalblip.policy import apply_trainable, check_trainable

    proc = build_tiny_processor("tiny", corpus=CORPUS)
    model = build_tiny_model(proc, "tiny")
    cfg = tiny_stage_cfg("stage2.yaml", synth_manifest, tmp_path / "x", parent=tmp_path,
                         **{"lora.language_model.targets": "[nonexistent_proj]"})
    with pytest.raises(UserError) as err:
        apply_trainable(model, cfg)
    msg = _one_line_error(err.value)
    assert "lora.language_model.targets [nonexistent_proj]" in msg
    assert "q_proj" in msg and "down_proj" in msg
    # a component that ends up with 0 trainable parameters
    report = {"qformer": {"policy": "full", "trainable": 0, "frozen": 10}, "language_model":
              {"policy": "lora", "trainable": 5, "frozen": 10}}
    with pytest.raises(UserError, match=r"trainable.qformer=full but qformer has 0 trainable parameters"):
        check_trainable(report)
