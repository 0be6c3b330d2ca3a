"""2 processes on a CPU (gloo): DDP, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + offload each train the same stage as
one process holding the whole effective batch; ZeRO-3 stage folders hold real weights, resume, select_best,
clipping, multi-node and exact gradient accumulation.

Every run trains the tiny stage 2 (LoRA on vision + LLM, Q-Former / queries / projection full) on top of one
shared stage 1, with dropout off (dropout masks differ per rank) and a constant learning rate.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from launch import ACCELERATE, LAUNCHERS, REPO, free_port, losses, max_diff, train, train_cmd, train_env, weights

pytestmark = pytest.mark.distributed

COMMON = ["data.val_max=4", "data.context_dropout=0.0", "train.log_every=1", "optim.schedule=constant",
          "optim.warmup_ratio=0", "lora.init=gaussian", "lora.language_model.dropout=0", "train.seed=1"]
TOL = 1e-5


@pytest.fixture(scope="module")
def parent(synth_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "stage1"
    proc = train([REPO / "configs/tiny/stage1.yaml", f"data.manifest={synth_manifest}", f"output_dir={out}",
                  "train.max_steps=2", "train.batch_size=4", "data.val_max=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def stage2(parent, synth_manifest):
    """stage2(name, backend=None, batch_size=4, **overrides) -> (folder, process); cached per name."""
    cache = {}

    def run(name, backend=None, batch_size=4, env=None, rerun=False, **over):
        if name in cache and not rerun:
            return cache[name]
        out = parent.parent / name
        args = [REPO / "configs/tiny/stage2.yaml", f"data.manifest={synth_manifest}", f"parent={parent}",
                f"output_dir={out}", f"train.batch_size={batch_size}", "train.max_steps=4", "optim.max_grad_norm=0",
                *COMMON, *[f"{k}={v}" for k, v in over.items()]]
        proc = train(args, env_extra=env, launcher=LAUNCHERS[backend] if backend else None)
        cache[name] = (out, proc)
        return out, proc

    return run


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_two_processes_equal_one_process(stage2, backend):
    ref, proc = stage2("ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the DeepSpeed default clip of 1.0 would bite on these gradients: max_grad_norm 0 must really be off
    assert max(json.loads(r).get("grad_norm") or 0 for r in (ref / "metrics.jsonl").read_text().splitlines()) > 1.0
    out, proc = stage2(backend, backend=backend, batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 4 (2 x 1 accum x 2 proc)" in proc.stdout
    assert proc.stdout.count("| stage 'stage2' ->") == 1  # the run header on the main process only
    if backend.startswith("zero"):
        assert f"DeepSpeed ZeRO-{backend[4]}" in proc.stdout
    a, b = losses(ref), losses(out)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= TOL, (a, b)
    got, want = weights(out), weights(ref)
    assert all(t.numel() > 0 for t in got.values())  # ZeRO-3: gathered, not shape-[0] placeholders
    assert max_diff(got, want) <= TOL
    info = json.loads((out / "stage.json").read_text())
    assert info["has_adapter"] and info["full_components"] == ["language_projection", "qformer", "query_tokens"]


def test_zero3_stage_chains_and_merges_like_ddp(stage2, synth_manifest, tmp_path):
    from clinicalblip.merge import merge_stage_chain

    z3, proc = stage2("zero3", backend="zero3", batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, proc = stage2("ddp", backend="ddp", batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ZeRO-3 stage is a parent like any other: a child stage trains on top of it
    child = tmp_path / "stage3"
    proc = train([REPO / "configs/tiny/stage2.yaml", f"data.manifest={synth_manifest}", f"parent={z3}",
                  f"output_dir={child}", "train.max_steps=1", "train.batch_size=4", "name=stage3", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge_stage_chain(str(z3), str(tmp_path / "rel_z3"))
    merge_stage_chain(str(ddp), str(tmp_path / "rel_ddp"))
    merge_stage_chain(str(child), str(tmp_path / "rel_child"))
    a = {}
    for rel in ("rel_z3", "rel_ddp"):
        a[rel] = {}
        for f in sorted((tmp_path / rel).glob("*.safetensors")):
            a[rel].update(load_file(str(f)))
    assert max_diff(a["rel_z3"], a["rel_ddp"]) <= TOL


def test_zero3_resume_after_kill_equals_uninterrupted(stage2):
    full, proc = stage2("zero3", backend="zero3", batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = dict(backend="zero3", batch_size=2, **{"train.save_every": 2})
    killed, proc = stage2("zero3_killed", env={"CLINICALBLIP_TEST_KILL_AT_STEP": "3"}, **run)
    assert proc.returncode != 0 and not (killed / "stage.json").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]
    _, proc = stage2("zero3_killed", rerun=True, **run)  # resume: auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert max_diff(weights(killed), weights(full)) <= TOL
    assert losses(killed) == pytest.approx(losses(full), abs=TOL)  # rows after the checkpoint: logged once


def test_zero3_select_best_writes_the_best_steps_weights(stage2):
    # a learning rate at which validation gets worse after step 2: the best step is not the last
    over = {"train.select_best": "true", "train.eval_every": 1, "optim.lr": 0.01, "train.max_steps": 4}
    for name, backend, bs in (("best_ref", None, 4), ("best_zero3", "zero3", 2)):
        best, proc = stage2(name, backend=backend, batch_size=bs, **over)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads((best / "stage.json").read_text())["metrics"]
        assert info["best_step"] == 2 and info["steps"] == 4 and info["val_loss"] == info["best_val_loss"], info
        assert "select_best: writing the weights of step 2" in proc.stdout
        # the weights of that step: the same run stopped there (constant schedule: the same trajectory)
        stop, proc = stage2(name + "_stop", backend=backend, batch_size=bs,
                            **{**over, "train.select_best": "false", "train.max_steps": 2})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert max_diff(weights(best), weights(stop)) <= 1e-6, name


def test_deepspeed_clips_with_max_grad_norm(stage2):
    clip = {"optim.max_grad_norm": 0.05}
    ref, proc = stage2("clip_ref", **clip)
    assert proc.returncode == 0, proc.stderr[-3000:]
    z2, proc = stage2("clip_zero2", backend="zero2", batch_size=2, **clip)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(weights(z2), weights(ref)) <= TOL
    unclipped, proc = stage2("zero2", backend="zero2", batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(weights(z2), weights(unclipped)) > 1e-4  # a small value really clips


def test_two_machines_equal_two_processes(stage2, synth_manifest, parent):
    """The README's multi-node recipe: one process per machine, machine 0 at --main_process_ip (ZeRO-2)."""
    z2, proc = stage2("zero2", backend="zero2", batch_size=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = parent.parent / "two_machines"
    args = [REPO / "configs/tiny/stage2.yaml", f"data.manifest={synth_manifest}", f"parent={parent}",
            f"output_dir={out}", "train.batch_size=2", "train.max_steps=4", "optim.max_grad_norm=0", *COMMON]
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        launcher = ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/zero2.yaml"), "--num_machines", "2",
                                 "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                 "--main_process_port", port]
        procs.append(subprocess.Popen(train_cmd(args, launcher), env=train_env(), cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "effective batch 4 (2 x 1 accum x 2 proc)" in outs[0][0] and "| stage 'stage2' ->" not in outs[1][0]
    assert max_diff(weights(out), weights(z2)) <= TOL
    assert losses(out) == pytest.approx(losses(z2), abs=TOL)


def test_gradient_accumulation_is_exact(stage2, tmp_path):
    """batch 4 x accum 1 == batch 2 x accum 2 == 2 processes x batch 1 x accum 2 (unequal report lengths)."""
    grads = {}
    for name, backend, bs, accum in (("acc_4x1", None, 4, 1), ("acc_2x2", None, 2, 2), ("acc_2p_1x2", "ddp", 1, 2)):
        path = tmp_path / f"{name}.safetensors"
        _, proc = stage2(name, backend=backend, batch_size=bs, env={"CLINICALBLIP_TEST_GRADS_AT_STEP": "1",
                                                                    "CLINICALBLIP_TEST_GRADS_OUT": str(path)},
                         **{"train.grad_accum": accum, "train.max_steps": 1})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"effective batch 4 ({bs} x {accum} accum x {2 if backend else 1} proc)" in proc.stdout
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            tokens = json.loads(fh.metadata()["window_tokens"])
        grads[name] = (load_file(str(path)), tokens)
    assert len(set(grads["acc_2x2"][1])) == 2  # the two micro-batches hold different numbers of report tokens
    assert sum(grads["acc_2x2"][1]) == sum(grads["acc_4x1"][1])
    ref = grads["acc_4x1"][0]
    assert len(ref) > 50
    for name in ("acc_2x2", "acc_2p_1x2"):
        assert max_diff(grads[name][0], ref) <= 1e-6, name
