"""Nothing silently wrong on reruns: a stage folder reused for another policy, a resume with another config or
manifest, a merge whose logits are not finite (issue: reruns, resumes, merges that refuse instead of corrupting)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clinicalblip.errors import UserError
from conftest import copy_chain, tiny_stage_cfg


# ---------------------------------------------------------------------------------------------- stage folders
def test_retraining_a_lora_stage_as_full_only_leaves_no_adapter(stage1_dir, synth_manifest, tmp_path):
    from peft import PeftModel

    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.stages import load_stage_model
    from clinicalblip.train import train_stage

    out = tmp_path / "stage2"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir, **{"train.max_steps": 1}))
    assert (out / "adapter").is_dir()
    # the same folder, retrained with no LoRA at all
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir, **{
        "train.max_steps": 1, "trainable.vision_model": "frozen", "trainable.language_model": "frozen",
        "train.resume": "none"}))
    info = json.loads((out / "stage.json").read_text())
    assert info["has_adapter"] is False and not (out / "adapter").exists()
    assert not list(tmp_path.glob(".stage2.*"))  # the temporary sibling was renamed into place
    model, _, _ = load_stage_model(out, keep_last_unmerged=True)
    assert not isinstance(model, PeftModel)
    merge_stage_chain(str(out), str(tmp_path / "rel"))
    assert json.loads((tmp_path / "rel" / "clinicalblip.json").read_text())["stages"][-1]["trainable"][
        "language_model"]["policy"] == "frozen"


def test_stage_json_is_the_only_authority(stage1_dir, stage2_dir, tmp_path):
    from clinicalblip.stages import load_stage_model

    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    info = json.loads((s2 / "stage.json").read_text())
    ref, _, _ = load_stage_model(s2)
    # a stray adapter in a stage whose stage.json says it has none is not applied
    shutil.copytree(s2 / "adapter", s1 / "adapter")
    assert json.loads((s1 / "stage.json").read_text())["has_adapter"] is False
    again, _, _ = load_stage_model(s2)
    a, b = dict(ref.named_parameters()), dict(again.named_parameters())
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    # what stage.json promises must be there
    (s2 / "trained.safetensors").unlink()
    with pytest.raises(UserError, match=r"stage.json lists fully trained .* trained.safetensors is missing"):
        load_stage_model(s2)
    assert info["full_components"]


def test_weights_of_a_component_stage_json_does_not_list_are_refused(stage1_dir, stage2_dir, tmp_path):
    from clinicalblip.stages import load_stage_model

    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    info = json.loads((s2 / "stage.json").read_text())
    info["full_components"] = [c for c in info["full_components"] if c != "qformer"]
    (s2 / "stage.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="holds qformer, which stage.json does not list"):
        load_stage_model(s2)


# ---------------------------------------------------------------------------------------------- resume
@pytest.fixture()
def checkpointed(synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    out = tmp_path / "s1"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"train.max_steps": 3, "train.save_every": 1,
                                                                       "train.keep_last": 5}))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-1", "step-2"]
    return out


def test_resume_with_another_config_stops_naming_the_keys(checkpointed, synth_manifest):
    from clinicalblip.train import train_stage

    cfg = tiny_stage_cfg("stage1.yaml", synth_manifest, checkpointed, **{"train.max_steps": 3, "train.save_every": 1,
                                                                          "optim.lr": 1e-4})
    with pytest.raises(UserError, match=r"config differs .*optim\.lr: 0\.001 -> 0\.0001.*train\.resume=none"):
        train_stage(cfg)


def test_resume_with_another_manifest_stops(checkpointed, synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    changed = tmp_path / "changed.jsonl"
    lines = synth_manifest.read_text().splitlines()
    changed.write_text("\n".join(lines[1:]) + "\n")  # one study fewer
    for img in (synth_manifest.parent / "images",):
        if img.is_dir() and not (tmp_path / "images").exists():
            (tmp_path / "images").symlink_to(img)
    cfg = tiny_stage_cfg("stage1.yaml", changed, checkpointed, **{"train.max_steps": 3, "train.save_every": 1})
    with pytest.raises(UserError, match=r"manifest .*changed since this checkpoint.*train\.resume=none"):
        train_stage(cfg)


def test_resume_allows_logging_knobs_and_resume_none_starts_over(checkpointed, synth_manifest, capsys):
    from clinicalblip.train import train_stage

    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, checkpointed, **{
        "train.max_steps": 3, "train.save_every": 2, "train.log_every": 2, "train.keep_last": 5}))
    assert "resumed from" in capsys.readouterr().out
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, checkpointed, **{
        "train.max_steps": 3, "train.resume": "none"}))
    out = capsys.readouterr().out
    assert "train.resume=none: starting over; removing 2 old checkpoint(s)" in out and "resumed from" not in out
    rows = [json.loads(line) for line in (checkpointed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # this run's rows only


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_with_non_finite_logits_fails_and_writes_nothing(stage1_dir, stage2_dir, tmp_path, bad):
    from clinicalblip.merge import merge_stage_chain

    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    good = merge_stage_chain(str(s2), str(tmp_path / "rel"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rel").iterdir()}
    sd = load_file(str(s2 / "trained.safetensors"))
    key = next(k for k in sd if k.startswith("language_projection") and k.endswith("weight"))
    sd[key] = torch.full_like(sd[key], bad)
    save_file(sd, str(s2 / "trained.safetensors"))
    with pytest.raises(UserError, match=r"non-finite logits \(NaN/Inf\).*nothing was written"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))
    # the earlier release is untouched; no half release beside it
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rel").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel", "stage1", "stage2"]
    with pytest.raises(UserError, match="non-finite"):
        merge_stage_chain(str(s2), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()
    assert good["status"] == "merged"


# ---------------------------------------------------------------------------------------------- knobs
def test_val_generate_logs_reports_and_clinical_f1(synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    out = tmp_path / "s"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"train.val_generate": 3, "train.eval_every": 2,
                                                                       "data.max_report_tokens": 16,
                                                                       "train.val_metric": "rules_micro5_upos"}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in rows if "val_clinical_macro_f1" in r]
    assert [r["step"] for r in gen] == [2] and gen[0]["val_generated"] == 3
    assert 0.0 <= gen[0]["val_clinical_macro_f1"] <= 1.0 and len(gen[0]["val_sample"]) == 1
    assert 0.0 <= gen[0]["val_rules_micro5_upos"] <= 1.0  # the chosen clinical metric, for checkpoint selection


def test_weight_decay_skips_norms_biases_and_query_tokens():
    from clinicalblip.config import stage_config_from_dict
    from clinicalblip.model import build_base
    from clinicalblip.policy import apply_trainable
    from clinicalblip.train import _param_groups

    cfg = stage_config_from_dict({"output_dir": "x", "data": {"manifest": "m"}, "optim": {"weight_decay": 0.1},
                                  "trainable": {"qformer": "full", "query_tokens": "full", "language_model": "lora"}})
    model, _ = build_base("tiny")
    model, _ = apply_trainable(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in _param_groups(model, cfg) if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in _param_groups(model, cfg) if g["weight_decay"] == 0 for p in g["params"]}
    assert not any(n.endswith(".bias") or "layernorm" in n.lower() or "query_tokens" in n for n in decayed)
    assert any("query_tokens" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    assert any("lora_A" in n for n in decayed) and any(n.endswith("query.weight") for n in decayed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept
