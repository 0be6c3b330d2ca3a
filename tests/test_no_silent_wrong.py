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
    # the configured limit and template of a stage YAML; lengths in the model's tokens with its tokenizer
    proc = build_tiny_processor("tiny", corpus=["word"] * 20)
    proc.tokenizer.save_pretrained(tmp_path / "tok")
    p50 = len(proc.tokenizer(rows[4]["findings"], add_special_tokens=False)["input_ids"])
    assert main(["data", "check", str(m), "--config", str(Path(__file__).parents[1] / "configs/tiny/stage1.yaml"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert f"findings length (tokens, n=10): p50 {p50} " in out
    assert "limit 96 tokens (data.max_report_tokens)" in out


def _long_report_manifest(src: Path, dst: Path, extra: list[dict] = ()) -> list[dict]:
    rows = _rows(src)
    for r in rows:
        if r["split"] == "train":
            r["findings"] = (r["findings"] + " ") * 3
    _write(dst, rows + list(extra))
    return rows


def test_train_header_counts_cut_reports_validates_final_weights_and_logs_skipped_targets(
        synth_manifest, tmp_path, capsys, monkeypatch):
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
    # the first step's supervised tokens, as the loss counts them: 12 per cut study, no EOS after the cut
    monkeypatch.setenv("CLINICALBLIP_TEST_GRADS_AT_STEP", "1")
    monkeypatch.setenv("CLINICALBLIP_TEST_GRADS_OUT", str(tmp_path / "grads.safetensors"))
    train_stage(cfg)
    log = capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "grads.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["window_tokens"]) == [4 * 12]
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


# ---------------------------------------------------------------------------------------------- 6: generate
def _test_split_manifest(synth_manifest: Path, name: str, edit) -> tuple[Path, list[dict]]:
    rows = _rows(synth_manifest)
    tests = [r for r in rows if r["split"] == "test"][:3]
    edit(tests)
    return _write(synth_manifest.parent / name, tests), tests


def test_generate_checks_records_before_loading(stage1_dir, synth_manifest, tmp_path, capsys):
    from clinicalblip.cli import main
    from clinicalblip.generate import generate_split

    def missing(tests):
        tests[1]["images"] = [{"path": "no/such.png", "view": "PA"}]

    m, tests = _test_split_manifest(synth_manifest, "missing_image.jsonl", missing)
    out = tmp_path / "preds.jsonl"
    with pytest.raises(UserError) as err:
        generate_split(str(stage1_dir), str(m), "test", str(out))
    msg = _one_line_error(err.value)
    assert f"1 of 3 records of split 'test' are unusable: {tests[1]['id']} (missing_image)" in msg
    assert not out.exists() and not Path(str(out) + ".meta.json").exists()
    # skip: the rest are generated, the skipped id is named
    assert main(["generate", str(stage1_dir), "--manifest", str(m), "--split", "test", "--out", str(out),
                 "--on-bad-record", "skip", "--workers", "0"]) == 0
    log = capsys.readouterr().out
    assert f"on_bad_record=skip: dropping 1 of 3 records of split 'test': {tests[1]['id']} (missing_image)" in log
    assert sorted(r["id"] for r in _rows(out)) == sorted([tests[0]["id"], tests[2]["id"]])
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["max_report_tokens"] == 96  # the stage's data.max_report_tokens (configs/tiny/stage1.yaml)


def test_generate_refuses_duplicate_ids_and_counts_records_without_a_target(stage1_dir, synth_manifest, tmp_path,
                                                                          capsys):
    from clinicalblip.generate import generate_split

    def dup(tests):
        tests[2]["id"] = tests[0]["id"]

    m, tests = _test_split_manifest(synth_manifest, "dup.jsonl", dup)
    with pytest.raises(UserError) as err:
        generate_split(str(stage1_dir), str(m), "test", str(tmp_path / "p.jsonl"))
    assert f"{tests[0]['id']} (duplicate_id)" in _one_line_error(err.value)

    def no_target(tests):
        tests[0]["findings"] = ""  # the stage's template writes findings

    # a study without a reference is generated (an unreported study), counted by name, and eval skips it
    m, tests = _test_split_manifest(synth_manifest, "no_target_test.jsonl", no_target)
    generate_split(str(stage1_dir), str(m), "test", str(tmp_path / "p.jsonl"), num_workers=0, max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert tests[0]["id"] in {r["id"] for r in rows}
    lines = capsys.readouterr().out.splitlines()
    assert any("have no reference findings: generated" in line and str(tests[0]["id"]) in line for line in lines)


def test_generate_failing_first_batch_leaves_no_empty_file(stage1_dir, synth_manifest, tmp_path, monkeypatch):
    from clinicalblip.generate import ReportModel, generate_split

    def boom(self, *a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(ReportModel, "generate_batch", boom)
    out = tmp_path / "p.jsonl"
    with pytest.raises(RuntimeError, match="device lost"):
        generate_split(str(stage1_dir), str(synth_manifest), "test", str(out), limit=2, num_workers=0)
    assert not out.exists() and not Path(str(out) + ".meta.json").exists()


# ---------------------------------------------------------------------------------------------- 5/6: eval rule
def _preds(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    return _write(path, [{"id": i, "prediction": p, "reference": r} for i, p, r in rows])


def test_eval_skips_empty_references_with_a_count_and_refuses_duplicates(tmp_path):
    from clinicalblip.metrics.compare import compare_files
    from clinicalblip.metrics.evaluate_predictions import evaluate_predictions

    p = _preds(tmp_path / "p.jsonl", [("a", "The heart is enlarged.", "The heart is enlarged."),
                                     ("b", "No acute findings.", ""),
                                     ("c", "Small left pleural effusion.", "Small left pleural effusion."),
                                     ("d", "The lungs are clear.", "Right pneumothorax.")])
    m = evaluate_predictions(p, tmp_path / "metrics.json", bootstrap=0, skip_java_metrics=True, report_md=False)
    assert m["n"] == 3 and m["empty_references"] == 1 and m["empty_reference_ids"] == ["b"]
    assert json.loads((tmp_path / "metrics.json").read_text())["empty_references"] == 1
    # every reference empty: nothing to score against
    e = _preds(tmp_path / "e.jsonl", [("a", "x", ""), ("b", "y", " ")])
    with pytest.raises(UserError, match="every record has an empty reference"):
        evaluate_predictions(e, tmp_path / "m2.json", bootstrap=0, skip_java_metrics=True, report_md=False)
    # one duplicate rule for eval and compare: a repeated id is refused, naming it and its lines
    d = _preds(tmp_path / "d.jsonl", [("a", "x", "The heart is enlarged."), ("b", "y", "Clear."),
                                     ("a", "z", "The heart is enlarged.")])
    with pytest.raises(UserError) as err:
        evaluate_predictions(d, tmp_path / "m3.json", bootstrap=0, skip_java_metrics=True, report_md=False)
    assert "id 'a' appears twice (first on line 1)" in _one_line_error(err.value) and "d.jsonl:3" in str(err.value)
    with pytest.raises(UserError, match="id 'a' appears twice"):
        compare_files([str(p), str(d)], str(tmp_path / "c.json"), resamples=10, skip_java_metrics=True)


# ---------------------------------------------------------------------------------------------- 3: merge --metrics
def test_merge_metrics_must_belong_to_the_chain(stage1_dir, synth_manifest, tmp_path):
    from clinicalblip.generate import generate_split
    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.metrics.evaluate_predictions import evaluate_predictions

    preds = tmp_path / "preds.jsonl"
    generate_split(str(stage1_dir), str(synth_manifest), "test", str(preds), limit=6, num_workers=0)
    good = tmp_path / "metrics.json"
    ev = evaluate_predictions(preds, good, bootstrap=50, skip_java_metrics=True, report_md=False)
    foreign = json.loads(good.read_text())
    foreign["provenance"]["model_hash"] = "0123456789abcdef"
    bad = tmp_path / "foreign.json"
    bad.write_text(json.dumps(foreign))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in foreign.items() if k != "provenance"}))
    jsonl = tmp_path / "preds_as_metrics.json"
    jsonl.write_text(preds.read_text())
    for path, words in ((bad, "scores model hash 0123456789abcdef, which is no stage of this chain"),
                        (bare, "has no provenance.model_hash"), (jsonl, "not a metrics.json")):
        with pytest.raises(UserError) as err:
            merge_stage_chain(str(stage1_dir), str(tmp_path / "rel"), metrics=str(path))
        msg = _one_line_error(err.value)
        assert words in msg and str(path) in msg
        assert not (tmp_path / "rel").exists()

    merge_stage_chain(str(stage1_dir), str(tmp_path / "rel"), metrics=str(good))
    card = (tmp_path / "rel" / "README.md").read_text()
    prov = ev["provenance"]
    assert "checked against this chain" in card and "stage 'stage1'" in card
    assert "| manifest | manifest.jsonl |" in card
    for row in (f"| dataset (manifest hash) | {prov['manifest_hash']} |", "| split | test |", f"| studies (n) | {ev['n']} |",
                "| NLG protocol | r2gen |", f"| clinical labeler | {ev['clinical']['labeler']} |"):
        assert row in card, row
    lo, hi = ev["nlg_ci95"]["BLEU_4"]
    assert f"| BLEU_4 | {ev['BLEU_4']:.4f} | {lo:.4f} - {hi:.4f} |" in card
    ci = ev["clinical"]["macro"]["f1_ci95"]
    assert f"{ev['clinical_macro_f1']:.4f} | {ci[0]:.4f} - {ci[1]:.4f} |" in card

    merge_stage_chain(str(stage1_dir), str(tmp_path / "rel2"), metrics=str(bad), force_metrics=True)
    card = (tmp_path / "rel2" / "README.md").read_text()
    assert "**Not verified:**" in card and "0123456789abcdef" in card and "--force-metrics" in card
