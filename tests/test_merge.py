"""Merge refusals: each ends with a clear message and writes no release."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clinicalblip.errors import UserError
from clinicalblip.merge import merge_stage_chain


def _copy_chain(stage1: Path, stage2: Path, tmp: Path) -> tuple[Path, Path]:
    s1, s2 = tmp / "stage1", tmp / "stage2"
    shutil.copytree(stage1, s1, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(stage2, s2, ignore=shutil.ignore_patterns("checkpoints"))
    return s1, s2


def test_broken_chain_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = _copy_chain(stage1_dir, stage2_dir, tmp_path)
    shutil.rmtree(s1)
    with pytest.raises(UserError, match="broken stage chain: .* names parent .*stage1"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))
    assert not (tmp_path / "rel").exists()


def test_different_base_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = _copy_chain(stage1_dir, stage2_dir, tmp_path)
    cfg = json.loads((s1 / "base" / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3  # a different base model: same shapes, other config
    (s1 / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="differs from the one stage 'stage1' was trained on"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))


def test_corrupted_adapter_is_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = _copy_chain(stage1_dir, stage2_dir, tmp_path)
    f = s2 / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot load the LoRA adapter"):
        merge_stage_chain(str(s2), str(tmp_path / "rel"))


def test_corrupted_full_weights_are_refused(stage1_dir, stage2_dir, tmp_path):
    s1, s2 = _copy_chain(stage1_dir, stage2_dir, tmp_path)
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


def test_bf16_release_is_verified_with_its_own_tolerance(stage2_dir, tmp_path):
    info = merge_stage_chain(str(stage2_dir), str(tmp_path / "rel16"), dtype="bf16")
    assert info["status"] == "merged" and info["max_abs_logit_diff"] <= info["tolerance"]
    meta = json.loads((tmp_path / "rel16" / "clinicalblip.json").read_text())
    assert meta["dtype"] == "bf16" and meta["verification"]["max_abs_logit_diff"] == info["max_abs_logit_diff"]
