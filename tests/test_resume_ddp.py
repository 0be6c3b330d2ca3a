"""Resume after a kill equals an uninterrupted run; 2-process DDP on CPU equals 1 process, same effective batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _train(args, env_extra=None, launcher=None, cwd=None):
    # one thread: multithreaded CPU kernels (e.g. attention backward) reduce in a timing-dependent order
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    cmd = (launcher or [sys.executable]) + ["-m", "clinicalblip", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=cwd)


def _weights(stage: Path) -> dict:
    return load_file(str(stage / "trained.safetensors"))


def _assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max |diff| {worst}"


def _common(manifest, out):
    # stage 1 (all components full), 3 epochs of ~8 batches; checkpoints every 3 steps
    return [REPO / "configs/tiny/stage1.yaml", f"data.manifest={manifest}", f"output_dir={out}", "train.max_steps=10",
            "train.batch_size=4", "train.save_every=3", "data.val_max=4", "train.log_every=1", "data.cache_images=false"]


def test_resume_after_kill_equals_uninterrupted(synth_manifest, tmp_path):
    full = tmp_path / "full"
    proc = _train(_common(synth_manifest, full))
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    # the same starting point: a tiny base is built in code (its tokenizer training is not bit-reproducible),
    # and a stage folder that already holds a base reuses it
    shutil.copytree(full / "base", killed / "base")
    proc = _train(_common(synth_manifest, killed), {"CLINICALBLIP_TEST_KILL_AT_STEP": "5"})
    assert proc.returncode == 137
    assert not (killed / "stage.json").exists()
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["step-3"]  # atomic: written aside then renamed; no half checkpoint left
    proc = _train(_common(synth_manifest, killed))  # resume: auto
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "step 3" in proc.stdout
    _assert_same(_weights(full), _weights(killed), atol=1e-6)


@pytest.mark.distributed
def test_two_process_ddp_equals_one_process(synth_manifest, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = [REPO / "configs/tiny/stage1.yaml", f"data.manifest={synth_manifest}", "train.max_steps=3",
            "data.val_max=4", "data.context_dropout=0.0"]
    assert _train(base + [f"output_dir={one}", "train.batch_size=4"]).returncode == 0
    shutil.copytree(one / "base", two / "base")  # the same tiny base (see the resume test)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = _train(base + [f"output_dir={two}", "train.batch_size=2"], launcher=launch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 4 (2 x 1 accum x 2 proc)" in proc.stdout
    assert proc.stdout.count("clinicalblip 0.") == 1  # run header on the main process only
    _assert_same(_weights(one), _weights(two), atol=2e-5)
