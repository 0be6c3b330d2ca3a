"""Merge refusals: each ends with a clear message and writes no release."""

from __future__ import annotations

import json
import shutil

import pytest

from clinicalblip.errors import UserError
from clinicalblip.merge import merge_stage_chain
from conftest import copy_chain


def test_broken_chain_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    shutil.rmtree(s1)
    with pytest.raises(UserError, match="broken stage chain: .* names parent .*stage1"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))
    assert not (tmp_path / "rel").exists()


def test_different_base_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    cfg = json.loads((s1 / "base" / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3  # a different base model: same shapes, other config
    (s1 / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="differs from the one stage 'stage1' was trained on"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))


def test_corrupted_adapter_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    f = s2 / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot load the LoRA adapter"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))


def test_corrupted_full_weights_are_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = copy_chain(stage1_dir, stage2_dir, tmp_path)
    (s2 / "trained.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupted weights file"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))


def test_merging_a_release_again_is_a_noop(stage2_dir, tmp_path):
    info = merge_stage_chain(str(stage2_dir), str(tmp_path / "rel"))
    assert info["status"] == "merged"
    before = sorted(p.name for p in (tmp_path / "rel").iterdir())
    again = merge_stage_chain(str(tmp_path / "rel"), str(tmp_path / "rel2"))
    assert again["status"] == "noop" and "already a merged release" in again["message"]
    assert not (tmp_path / "rel2").exists()
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == before


def test_not_enough_disk_is_refused(stage2_dir, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="not enough disk .* needs ~.* GiB"):
        merge_stage_chain(str(stage2_dir), str(tmp_path / "rel"))


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 0.05)])
def test_release_logits_match_the_adapter_chain(stage1_dir, stage2_dir, synth_manifest, tmp_path, dtype, tol):
    """The release, reloaded with plain transformers, against the adapter chain on real studies (not merge's probe)."""
    import torch
    from transformers import InstructBlipForConditionalGeneration

    from clinicalblip.data.collate import StudyCollator, model_inputs
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.stages import load_stage_model, load_template_of

    info = merge_stage_chain(str(stage2_dir), str(tmp_path / "rel"), dtype=dtype)
    meta = json.loads((tmp_path / "rel" / "clinicalblip.json").read_text())
    assert meta["dtype"] == dtype and meta["verification"]["max_abs_logit_diff"] == info["max_abs_logit_diff"]

    chain, processor, _ = load_stage_model(stage2_dir, keep_last_unmerged=True)  # stage 2's LoRA still live
    parent, _, _ = load_stage_model(stage1_dir)
    collate = StudyCollator(processor=processor, template=load_template_of(stage2_dir),
                            num_query_tokens=processor.num_query_tokens, mode="train")
    batch = model_inputs(collate(read_manifest(synth_manifest, split="test")[:3]))
    release = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "rel", dtype=getattr(torch, {
        "fp32": "float32", "bf16": "bfloat16"}[dtype])).eval()

    def logits(model):
        with torch.no_grad():
            return model(**dict(batch, pixel_values=batch["pixel_values"].to(model.dtype))).logits.float()

    ref, got = logits(chain.eval()), logits(release)
    scale = max(1.0, ref.abs().max().item())
    assert torch.isfinite(got).all()
    d_release = (got - ref).abs().max().item()
    assert d_release <= tol * scale
    # and stage 2 is really in the release: stage 1 alone is much further from the chain
    d_parent = (logits(parent) - ref).abs().max().item()
    print(f"{dtype}: release vs chain {d_release:.2e}, stage 1 vs chain {d_parent:.2e}")
    assert d_parent > max(10 * d_release, 0.1)
