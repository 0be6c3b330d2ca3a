"""Issue 24 items 9-15: traps a careful user still hits, each fed here and answered with the right result or a
one-line `error:` naming the key, flag or file."""

from __future__ import annotations

import json
import re
import os
import stat
from pathlib import Path

import pytest

from conftest import REPO

from clinicalblip import cli


def _one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"clinicalblip {verb}: error: "), err
    return err


def _no_loading(monkeypatch):
    """Anything that would load data or a model fails the test: the error must come first."""
    import clinicalblip.merge as merge
    import clinicalblip.train as train

    def boom(*a, **k):
        raise AssertionError("loading started before the input was checked")

    monkeypatch.setattr(train, "train_stage", boom)
    monkeypatch.setattr(merge, "merge_stage_chain", boom)


# ---------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("override,words", [
    ("optim.lr=-1", "optim.lr must be a positive number, got -1"),
    ("optim.lr=0", "optim.lr must be a positive number"),
    ("data.max_views=0", "data.max_views must be >= 1"),
    ("data.max_report_tokens=0", "data.max_report_tokens must be >= 1"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio must be in [0, 1)"),
    ("optim.lr_mult.vision_model=0", "optim.lr_mult.vision_model must be > 0"),
])
def test_bad_numbers_in_a_stage_config_are_one_line_errors_before_loading(override, words, tmp_path, monkeypatch,
                                                                         capsys):
    _no_loading(monkeypatch)
    rc = cli.main(["train", str(REPO / "configs" / "tiny" / "stage1.yaml"), override,
                   f"output_dir={tmp_path / 'out'}", f"data.manifest={tmp_path / 'm.jsonl'}"])
    assert rc == 2
    assert words in _one_line_error(capsys, "train")


def test_generate_num_beams_0_is_a_one_line_error_before_loading(tmp_path, monkeypatch, capsys):
    import clinicalblip.generate as G

    monkeypatch.setattr(G.ReportModel, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert cli.main(["generate", str(tmp_path), "--manifest", "m.jsonl", "--out", "p.jsonl", "--num-beams", "0"]) == 2
    assert "--num-beams: 0 is out of range [1, inf)" in _one_line_error(capsys, "generate")


def test_merge_metrics_given_a_predictions_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "1", "prediction": "a", "reference": "b"}\n{"id": "2", "prediction": "a", '
                     '"reference": "b"}\n')
    assert cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "rel"), "--metrics", str(preds)]) == 2
    err = _one_line_error(capsys, "merge")
    assert "preds.jsonl: not a metrics.json" in err and "predictions JSONL" in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "rel"), "--metrics", str(other)]) == 2
    assert "no 'n', 'protocol' or 'clinical' key" in _one_line_error(capsys, "merge")


# ---------------------------------------------------------------------------------------------- item 13
def _weights(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_weights_in_stages_and_releases_get_the_umask_mode(stage1_dir, trained_release):
    from clinicalblip.filemode import umask_file_mode

    want = umask_file_mode()
    stage_files = _weights(stage1_dir)
    names = {p.name for p in stage_files}
    assert "adapter_model.safetensors" in names or "trained.safetensors" in names, names
    release_files = _weights(trained_release)
    assert release_files
    for p in stage_files + release_files:
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_give_umask_mode_follows_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from clinicalblip.filemode import give_umask_mode

    old = os.umask(0o002)
    try:
        (tmp_path / "a").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp_path / "a" / "x.safetensors"))
        assert stat.S_IMODE((tmp_path / "a" / "x.safetensors").stat().st_mode) == 0o600  # what safetensors does
        give_umask_mode(tmp_path)
        assert stat.S_IMODE((tmp_path / "a" / "x.safetensors").stat().st_mode) == 0o664
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------- item 15
def test_release_records_stage_paths_relative_to_itself(trained_release):
    meta = json.loads((trained_release / "clinicalblip.json").read_text())
    for st in meta["stages"]:
        assert not os.path.isabs(st["dir"]), st
        assert (trained_release / st["dir"] / "stage.json").is_file()


def test_version_flag(capsys):
    from clinicalblip import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"clinicalblip {__version__}"


def test_compare_help_prints_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out


def test_backend_reads_as_plain_words():
    from clinicalblip.train import _backend_words

    assert _backend_words("NO", 1) == "single process"
    assert _backend_words("MULTI_GPU", 4) == "DDP, 4 processes"
    assert _backend_words("MULTI_CPU", 2) == "DDP (CPU, gloo), 2 processes"


def test_bad_record_hint_shows_the_override_syntax(tmp_path):
    from clinicalblip.data.check import BadRecordsError, apply_bad_record_policy

    recs = [{"id": "a", "split": "train", "images": [{"path": str(tmp_path / "missing.png")}], "findings": "x"}]
    with pytest.raises(BadRecordsError, match=r"skip them with data\.on_bad_record=skip"):
        apply_bad_record_policy(recs, "error", log=lambda m: None, check_images="exists", root=tmp_path,
                                share=False)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import clinicalblip.train as train

    out = tmp_path / "stage"
    config = str(REPO / "configs" / "tiny" / "stage1.yaml")

    def interrupted_after_a_checkpoint(cfg):
        for step in (2, 4):
            (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
            (out / "checkpoints" / f"step-{step}" / "progress.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_stage", interrupted_after_a_checkpoint)
    argv = ["train", config, f"output_dir={out}", f"data.manifest={tmp_path / 'm.jsonl'}", "train.save_every=2"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert f"the last checkpoint is {out / 'checkpoints' / 'step-4'} (step 4)" in err
    assert f"clinicalblip train {config} output_dir={out}" in err and "train.save_every=2" in err

    monkeypatch.setattr(train, "train_stage", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["train", config, f"output_dir={tmp_path / 'other'}", f"data.manifest={tmp_path / 'm.jsonl'}",
                     "train.save_every=0"]) == 130
    assert "no checkpoint is written, so a rerun starts over. Set train.save_every=N" in capsys.readouterr().err


def test_card_snippet_decodes_only_the_new_tokens(trained_release, synth_manifest):
    """The model card's plain-transformers code, run as a user would: its report is ours, without the prompt."""
    import re

    from clinicalblip.data.images import load_image
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.generate import ReportModel

    card = (trained_release / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    rec = read_manifest(synth_manifest, split="test")[0]
    rm = ReportModel.load(str(trained_release), device="cpu")
    ours = rm.report([rec["images"][0]["path"]], indication=rec["indication"], max_new_tokens=128)
    scope = {"PATH": str(trained_release), "image": load_image(rec["images"][0]["path"]), "prompt": ours["prompt"]}
    exec(code, scope)
    assert scope["report"].strip() == ours["report"]
    assert not scope["report"].startswith(ours["prompt"][:20])


# ---------------------------------------------------------------------------------------------- item 10
def test_missing_tensorboard_is_refused_naming_the_package_and_extra(tmp_path, monkeypatch):
    import importlib.util

    from clinicalblip.config import load_stage_config
    from clinicalblip.errors import UserError
    from clinicalblip.train import train_stage

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = load_stage_config(REPO / "configs" / "tiny" / "stage1.yaml",
                            [f"output_dir={tmp_path / 'o'}", f"data.manifest={tmp_path / 'm.jsonl'}",
                             "train.report_to=tensorboard"])
    with pytest.raises(UserError, match=r"needs the 'tensorboard' package.*clinicalblip\[tracking\]"):
        train_stage(cfg)
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_a_tracked_run_logs_the_resolved_config_and_a_resume_may_extend_max_steps(synth_manifest, tmp_path,
                                                                                 monkeypatch, capsys):
    from accelerate import Accelerator

    from conftest import tiny_stage_cfg
    from clinicalblip.errors import UserError
    from clinicalblip.train import train_stage

    seen = {}
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None, **k: seen.update(config))
    out = tmp_path / "stage"
    # checkpoints are written before the last step (the stage itself holds the final weights): step-2 of 3
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"train.save_every": 2, "train.max_steps": 3,
                                                                      "train.report_to": "tensorboard"}))
    assert seen["optim.lr"] > 0 and seen["train.max_steps"] == 3 and seen["data.template"] == "findings_with_context"
    assert seen["output_dir"] == str(out)
    from clinicalblip.filemode import umask_file_mode

    ckpt_weights = _weights(out / "checkpoints")
    assert ckpt_weights and all(stat.S_IMODE(p.stat().st_mode) == umask_file_mode() for p in ckpt_weights)
    assert all(isinstance(v, (int, float, str, bool)) for v in seen.values())
    header = capsys.readouterr().out
    assert "single process on cpu" in header and "NO on" not in header

    # a longer run from the step-2 checkpoint
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"train.save_every": 2, "train.max_steps": 5}))
    log = capsys.readouterr().out
    assert "train.max_steps 3 -> 5: extending the run from step 2" in log and "resumed from" in log, log
    assert "step 3/5" in log and "step 5/5" in log and "step 1/5" not in log
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 5
    assert json.loads((out / "stage.json").read_text())["metrics"]["steps"] == 5
    # a resume can extend a run, not shorten it past its checkpoint
    with pytest.raises(UserError, match="is not beyond this checkpoint's step 4"):
        train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"train.save_every": 2,
                                                                          "train.max_steps": 3}))


# ---------------------------------------------------------------------------------------------- item 9
def _export(tmp_path, n_patients=30, per_patient=3) -> Path:
    import csv

    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession", "mrn", "img", "report_text", "AGE_Y", "gender"])
        for p in range(n_patients):
            for s in range(per_patient):
                w.writerow([f"S{p}-{s}", f"P{p}", f"img/{p}_{s}.png", "The heart is normal.", str(40 + p), "F"])
    return path


def _prepare(tmp_path, *extra, out="m.jsonl") -> list[dict]:
    from clinicalblip.data.manifest import read_manifest

    argv = ["data", "prepare", "csv", str(_export(tmp_path)), "--map", "id=accession", "--map", "patient_id=mrn",
            "--map", "images=img", "--map", "findings=report_text", "--map", "age=AGE_Y", "--map", "sex=gender",
            "--out", str(tmp_path / out), *extra]
    assert cli.main(argv) == 0
    return read_manifest(tmp_path / out)


def test_prepare_split_by_patient_gives_whole_patients_the_ratios_and_is_seeded(tmp_path, capsys):
    from collections import Counter, defaultdict

    recs = _prepare(tmp_path, "--split-by", "patient_id", "--ratios", "0.7,0.1,0.2", "--seed", "1")
    assert "split by: patient_id, seed 1: train 21, val 3, test 6 patients" in capsys.readouterr().out
    by_patient = defaultdict(set)
    for r in recs:
        by_patient[r["patient_id"]].add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    assert Counter(next(iter(s)) for s in by_patient.values()) == {"train": 21, "val": 3, "test": 6}
    assert recs[0]["age"] == 40 and recs[0]["sex"] == "F"  # age/sex as --map targets
    again = _prepare(tmp_path, "--split-by", "patient_id", "--seed", "1", out="m2.jsonl")
    assert [r["split"] for r in again] == [r["split"] for r in recs]
    other = _prepare(tmp_path, "--split-by", "patient_id", "--seed", "2", out="m3.jsonl")
    assert [r["split"] for r in other] != [r["split"] for r in recs]


def test_prepare_refuses_bad_ratios(tmp_path, capsys):
    argv = ["data", "prepare", "csv", str(_export(tmp_path)), "--map", "id=accession", "--split-by", "patient_id",
            "--ratios", "0.7,0.2,0.2", "--out", str(tmp_path / "m.jsonl")]
    assert cli.main(argv) == 2
    assert "--ratios '0.7,0.2,0.2'" in _one_line_error(capsys, "data")
    assert cli.main(argv[:-4] + ["--ratios", "0.7,0.1,0.2", "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "have no patient_id" in _one_line_error(capsys, "data")  # mrn not mapped, no patient_id column


def test_data_check_flags_records_no_split_uses(tmp_path, capsys):
    _prepare(tmp_path)
    capsys.readouterr()
    cli.main(["data", "check", str(tmp_path / "m.jsonl"), "--images", "none"])
    out = capsys.readouterr().out
    assert re.search(r"warning no_split\s+90", out), out
    assert "no record has a split: `train` would find no train records" in out
    _prepare(tmp_path, "--split-by", "patient_id", out="split.jsonl")
    capsys.readouterr()
    assert cli.main(["data", "check", str(tmp_path / "split.jsonl"), "--images", "none"]) == 0
    assert "no_split" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- item 11
def test_print_config_prints_every_resolved_key_with_a_comment(capsys, monkeypatch):
    import yaml

    from clinicalblip.config import load_stage_config

    _no_loading(monkeypatch)
    config = str(REPO / "configs" / "tiny" / "stage1.yaml")
    assert cli.main(["train", "--print-config", config, "optim.lr=2e-4", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    cfg = load_stage_config(config, ["optim.lr=2e-4", "train.max_steps=7"])
    assert yaml.safe_load(out) == cfg.to_dict()  # the resolved config, defaults included, loads back as it is
    leaves = [line for line in out.splitlines() if not line.startswith("#") and not line.rstrip().endswith(":")]
    assert len(leaves) > 60
    for line in leaves:
        assert "  # " in line and line.split("  # ", 1)[1].strip(), line
    assert re.search(r"^  max_steps: 7 +# optimizer steps; 0 = from epochs", out, re.M)
    assert re.search(r"^  lr: 0\.0002 +# peak learning rate", out, re.M)
    assert re.search(r"^  on_bad_record: error +# error \| skip", out, re.M)


# ---------------------------------------------------------------------------------------------- item 14
REFS = ["The heart is enlarged. No pleural effusion.", "Small left pleural effusion. Heart size is normal.",
        "No acute cardiopulmonary process.", "Cardiomegaly with mild pulmonary edema."]
PREDS_A = ["The heart is enlarged.", "Heart size is normal. No effusion.", "No acute cardiopulmonary process.",
           "Cardiomegaly."]
PREDS_B = ["Cardiomegaly. No pleural effusion.", "Small left pleural effusion.", "No acute cardiopulmonary process.",
           "Cardiomegaly with mild pulmonary edema."]


def _preds(tmp_path, name, preds) -> Path:
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"id": f"s{i}", "prediction": a, "reference": r}) + "\n"
                         for i, (a, r) in enumerate(zip(preds, REFS))))
    return p


def test_report_shows_na_for_absent_labels_a_present_macro_and_the_labeler_note():
    from clinicalblip.metrics.evaluate_predictions import evaluate_records, format_summary
    from clinicalblip.metrics.report import render_markdown

    recs = [{"id": f"s{i}", "prediction": a, "reference": r, "_line": i + 1}
            for i, (a, r) in enumerate(zip(PREDS_A, REFS))]
    metrics, _ = evaluate_records(recs, "r2gen", "chexpert", bootstrap=0, seed=0, skip_java_metrics=True)
    metrics.setdefault("n", len(recs))
    md = render_markdown(metrics)
    per = metrics["clinical"]["per_label"]
    assert per["Fracture"]["support"] == 0 and per["Fracture"]["predicted"] == 0
    assert "| Fracture | 0 | 0 | n/a | n/a | n/a | |" in md
    assert "| Fracture | 0 | 0 | 0.0000" not in md
    present = [o for o, b in per.items() if b["support"] or b["predicted"]]
    row = re.search(rf"\| \*\*macro \({len(present)} labels present\)\*\* \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|", md)
    assert row, md
    assert abs(float(row.group(1)) - sum(per[o]["f1"] for o in present) / len(present)) < 1e-4
    assert "| **macro (14 labels)** |" in md  # the all-label macro stays beside it
    assert "not CheXbert F1" in md and "not CheXbert F1" in format_summary(metrics)


def test_compare_hides_rows_nobody_has(tmp_path):
    from clinicalblip.metrics.compare import compare_files, format_table

    a, b = _preds(tmp_path, "a", PREDS_A), _preds(tmp_path, "b", PREDS_B)
    result = compare_files([a, b], tmp_path / "c.json", resamples=50, labeler="chexpert", skip_java_metrics=True)
    assert "f1/Fracture" in result["empty_rows"] and "f1/Cardiomegaly" not in result["empty_rows"]
    table = format_table(result)
    assert "f1/Fracture" not in table and "f1/Cardiomegaly" in table
    assert re.search(r"not shown: .*Fracture.*no support in the references and never predicted", table)
