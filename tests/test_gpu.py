"""Real GPU paths (opt-in: ./test.sh -m gpu): bf16 training, a 4-bit QLoRA stage, ZeRO-3 on one GPU.
Each skips cleanly on a machine without CUDA (CI, the dev machines)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_stage_cfg
from launch import ACCELERATE, REPO, losses, train

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_bf16_stage_trains_on_gpu(synth_manifest, tmp_path):
    from clinicalblip.train import train_stage

    out = tmp_path / "bf16"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"model.dtype": "bf16", "train.max_steps": 6}))
    loss = losses(out)
    assert all(x == x for x in loss) and loss[-1] < loss[0]


def test_qlora_4bit_stage_on_gpu(stage1_dir, synth_manifest, tmp_path):
    import bitsandbytes as bnb

    from clinicalblip.generate import ReportModel
    from clinicalblip.train import train_stage

    out = tmp_path / "q4"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir, **{
        "model.quantization": "4bit", "model.dtype": "bf16", "train.max_steps": 6, "optim.lr": 3e-3}))
    loss = losses(out)
    assert loss[-1] < loss[0]
    rm = ReportModel.load(str(out), quantization="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in rm.model.modules())
    assert next(rm.model.parameters()).is_cuda


def test_zero3_on_one_gpu(stage1_dir, synth_manifest, tmp_path):
    out = tmp_path / "z3"
    proc = train([REPO / "configs/tiny/stage2.yaml", f"data.manifest={synth_manifest}", f"parent={stage1_dir}",
                  f"output_dir={out}", "train.max_steps=3", "train.batch_size=4", "model.dtype=bf16"],
                 launcher=ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/zero3.yaml"),
                                        "--num_processes", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3 on cuda" in proc.stdout
    info = json.loads((out / "stage.json").read_text())
    assert info["has_adapter"] and info["full_components"]
