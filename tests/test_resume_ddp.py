"""Resume after a kill equals an uninterrupted run; 2-process DDP on CPU equals 1 process, same effective batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_training_with_skip_drops_exactly_the_bad_records_and_says_so(synth_manifest, tmp_path):
    """corrupt image, missing file, empty report, duplicate id, patient in two splits: dropped, named, counted."""
    import json

    from clinicalblip.data.manifest import read_manifest

    good = read_manifest(synth_manifest)  # absolute image paths
    train = [r for r in good if r["split"] == "train"]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    bad = [
        dict(train[0], id="bad-corrupt", patient_id="pc", images=[{"path": str(tmp_path / "corrupt.png"), "view": "PA"}]),
        dict(train[0], id="bad-missing", patient_id="pm", images=[{"path": str(tmp_path / "nope.png"), "view": "PA"}]),
        dict(train[0], id="bad-empty", patient_id="pe", findings="", impression=""),
        dict(train[0], id="bad-dup", patient_id="pd1"), dict(train[0], id="bad-dup", patient_id="pd2"),
        dict(train[0], id="bad-leak-a", patient_id="pleak", split="train"),
        dict(train[0], id="bad-leak-b", patient_id="pleak", split="test"),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    out = tmp_path / "stage"
    args = [REPO / "configs/tiny/stage1.yaml", f"data.manifest={manifest}", f"output_dir={out}", "train.max_steps=1",
            "train.batch_size=4", "data.val_max=4"]
    proc = _train(args)  # default on_bad_record: error -> refused, naming the records
    assert proc.returncode == 2 and "bad-corrupt" in proc.stderr and "data.on_bad_record=skip" in proc.stderr
    proc = _train(args + ["data.on_bad_record=skip"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if "on_bad_record=skip" in l)
    for rid in ("bad-corrupt", "bad-missing", "bad-empty", "bad-dup", "bad-leak-a", "bad-leak-b"):
        assert rid in line
    assert f"dropping {len(bad)} of {len(good) + len(bad)} records" in line
    info = json.loads((out / "stage.json").read_text())
    assert info["metrics"]["train_studies"] == len(train)  # exactly the good train studies remain
