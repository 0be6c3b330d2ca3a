"""Training modes the default run does not use: bf16 on CPU and gradient checkpointing (frozen embeddings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clinicalblip.data.manifest import read_manifest

from conftest import tiny_stage_cfg


def _lora_b(stage: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in sd.items() if "lora_B" in k}


def _changed(before: dict, after: dict) -> list[str]:
    return [k for k in after if k in before and not torch.equal(before[k].float(), after[k].float())]


def _long_history_manifest(src: Path, dst: Path) -> str:
    """The synthetic manifest with absolute image paths and one train study whose history is very long."""
    rows, long_id = [], None
    for r in read_manifest(src):
        if long_id is None and r["split"] == "train":
            r, long_id = dict(r, history=" ".join(["dyspnoea"] * 400)), r["id"]
        rows.append(json.dumps(r))
    dst.write_text("\n".join(rows) + "\n")
    return long_id


@pytest.fixture()
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a bf16 run in this process needs it cleared, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_training_on_cpu(stage1_dir, synth_manifest, tmp_path, capsys, fresh_accelerate_state):
    from clinicalblip.train import train_stage

    manifest = tmp_path / "m.jsonl"
    _long_history_manifest(synth_manifest, manifest)
    out = tmp_path / "bf16"
    train_stage(tiny_stage_cfg("stage2.yaml", manifest, out, parent=stage1_dir,
                               **{"model.dtype": "bf16", "train.max_steps": 2, "data.val_max": 2}))
    header = capsys.readouterr().out
    n_train = sum(1 for r in read_manifest(manifest) if r["split"] == "train")
    assert f"prompts: 1 of {n_train} train studies shortened to data.max_prompt_tokens=256" in header
    assert "dtype: bf16" in header
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    lora_b = _lora_b(out)  # zero at the start (default init): non-zero only if gradients reached them
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    assert all(v.dtype == torch.float32 for v in lora_b.values())  # trainable weights kept fp32
    full = load_file(str(out / "trained.safetensors"))
    parent = load_file(str(stage1_dir / "trained.safetensors"))
    qformer = [k for k in full if k.startswith("qformer.")]
    assert len(_changed(parent, {k: full[k] for k in qformer})) > len(qformer) // 2


def test_gradient_checkpointing_trains_lora_behind_frozen_embeddings(stage1_dir, synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    out = tmp_path / "gc"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir,
                               **{"model.gradient_checkpointing": True, "train.max_steps": 2}))
    lora_b = _lora_b(out)
    lm = {k: v for k, v in lora_b.items() if "language_model" in k}
    vision = {k: v for k, v in lora_b.items() if "vision_model" in k}
    assert lm and vision
    # every LoRA B of the checkpointed language model left zero: gradients flowed through the checkpoints
    assert [k for k, v in lm.items() if v.abs().sum() == 0] == []
    assert [k for k, v in vision.items() if v.abs().sum() == 0] == []
    cfg = json.loads((out / "stage.json").read_text())
    assert cfg["name"] == "stage2"
