"""The loader: the epoch reaches worker processes, batches do not depend on the worker count, resume with
workers on equals an uninterrupted run, and the record check runs once, is shared and is stored."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.data.check import apply_bad_record_policy, check_manifest, header_problem
from clinicalblip.data.loader import default_num_workers, make_loader
from clinicalblip.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


class EpochEcho:
    """A collator whose output is the epoch it holds: what a worker's copy of the collator sees."""

    epoch = 0

    def __call__(self, records):
        return [(r["id"], self.epoch, os.getpid()) for r in records]


class Sampler:
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, e):
        self.epoch = e

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


def test_the_epoch_reaches_persistent_workers():
    records = [{"id": str(i)} for i in range(8)]
    sampler = Sampler(len(records))
    loader = make_loader(records, 2, EpochEcho(), sampler=sampler, num_workers=2)
    pids = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        rows = [row for batch in loader for row in batch]
        assert [r[0] for r in rows] == [str(i) for i in range(8)]
        assert {r[1] for r in rows} == {epoch}  # a mutated attribute in the main process would stay 0 here
        pids |= {r[2] for r in rows}
    assert os.getpid() not in pids and len(pids) == 2  # the same two persistent workers did the work


def test_batches_do_not_depend_on_the_worker_count(synth_manifest):
    """Context dropout draws per (seed, epoch, id): the prompts of every epoch are the same with 0 or 2 workers."""
    from clinicalblip.data.cache import pixel_source
    from clinicalblip.data.collate import StudyCollator
    from clinicalblip.prompts import load_template
    from clinicalblip.tiny import build_tiny_processor
    from clinicalblip.train import EpochSampler

    records = read_manifest(synth_manifest, split="train")[:12]
    processor = build_tiny_processor("tiny")

    def prompts(workers):
        collate = StudyCollator(processor=processor, template=load_template("findings_with_context"),
                                num_query_tokens=processor.num_query_tokens, context_dropout=0.5, seed=1,
                                image_cache=pixel_source(processor.image_processor))
        sampler = EpochSampler(len(records), seed=1)
        loader = make_loader(records, 4, collate, sampler=sampler, num_workers=workers)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.append([(i, p) for b in loader for i, p in zip(b["ids"], b["prompts"])])
        return out

    zero, two = prompts(0), prompts(2)
    assert zero == two
    assert sorted(zero[0]) != sorted(zero[1])  # dropout drew differently in epoch 1: the epoch mattered


def test_default_workers_follow_the_machine(monkeypatch):
    import clinicalblip.data.loader as L

    monkeypatch.setattr(L, "available_cpus", lambda: 16)
    assert default_num_workers(processes_per_node=8, gpu=True) == 2
    assert default_num_workers(processes_per_node=1, gpu=False) == 8  # capped
    monkeypatch.setattr(L, "available_cpus", lambda: 2)
    assert default_num_workers(processes_per_node=1, gpu=False) == 1
    assert default_num_workers(processes_per_node=2, gpu=False) == 0  # two CPU ranks on two cores: no room


def _train(args, env_extra=None):
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "clinicalblip", "train", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)


def test_resume_with_workers_equals_uninterrupted(synth_manifest, tmp_path):
    from safetensors.torch import load_file

    def args(out):
        return [REPO / "configs/tiny/stage1.yaml", f"data.manifest={synth_manifest}", f"output_dir={out}",
                "train.max_steps=8", "train.batch_size=4", "train.save_every=3", "data.val_max=4",
                "train.log_every=1", "data.cache_images=false", "data.num_workers=2", "data.context_dropout=0.5"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _train(args(full))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loader workers per rank: 2" in proc.stdout
    shutil.copytree(full / "base", killed / "base")  # the same tiny base (see test_resume_ddp)
    assert _train(args(killed), {"CLINICALBLIP_TEST_KILL_AT_STEP": "7"}).returncode == 137  # epoch 1, mid-epoch
    proc = _train(args(killed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    a, b = load_file(str(full / "trained.safetensors")), load_file(str(killed / "trained.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ---------------------------------------------------------------------------------------------- checks
@pytest.fixture
def small_manifest(tmp_path):
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(ok)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "ok.jpg")
    data = ok.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-30])  # header fine, pixels cut off: only decoding sees it
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 5 + b"\xff\xd9")
    recs = [{"id": n, "patient_id": n, "split": "train", "findings": "Clear.", "images": [{"path": f"{n}", "view": "PA"}]}
            for n in ("ok.png", "ok.jpg", "cut.png", "empty.png", "fake.jpg")]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_header_check_is_cheap_and_decode_is_explicit(small_manifest):
    header = check_manifest(small_manifest).bad()
    assert set(header) == {"empty.png", "fake.jpg"}
    assert "empty file" in header["empty.png"][0] and "without a frame header" in header["fake.jpg"][0]
    assert set(check_manifest(small_manifest, check_images="decode").bad()) == {"cut.png", "empty.png", "fake.jpg"}
    from clinicalblip.cli import main

    assert main(["data", "check", str(small_manifest), "--decode"]) == 1
    assert header_problem(str(small_manifest.parent / "ok.jpg")) is None


def test_check_result_is_stored_and_reused_until_a_file_changes(small_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICALBLIP_CACHE", str(tmp_path / "home"))
    records = read_manifest(small_manifest)
    logs = []
    kept = apply_bad_record_policy(records, "skip", log=logs.append, manifest=small_manifest)
    assert [r["id"] for r in kept] == ["ok.png", "ok.jpg", "cut.png"] and not any("reusing" in l for l in logs)
    logs.clear()
    assert apply_bad_record_policy(records, "skip", log=logs.append, manifest=small_manifest) == kept
    assert any("reusing" in l for l in logs)
    # a file changes: the stored result no longer applies
    Image.fromarray(np.full((8, 8), 1, np.uint8)).save(small_manifest.parent / "empty.png")
    logs.clear()
    kept = apply_bad_record_policy(records, "skip", log=logs.append, manifest=small_manifest)
    assert not any("reusing" in l for l in logs) and len(kept) == 4


def _rank(rank, world, init, manifest, home, out):
    import torch.distributed as dist

    os.environ["CLINICALBLIP_CACHE"] = home
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import clinicalblip.data.check as C

    calls = []
    real = C.bad_record_list
    C.bad_record_list = lambda *a, **k: calls.append(1) or real(*a, **k)
    kept = C.apply_bad_record_policy(read_manifest(manifest), "skip", log=lambda m: None, manifest=manifest)
    try:
        C.apply_bad_record_policy(read_manifest(manifest), "error", log=lambda m: None, manifest=manifest)
        error = None
    except C.BadRecordsError as exc:
        error = str(exc)[:40]
    Path(out, f"{rank}.json").write_text(json.dumps({"kept": [r["id"] for r in kept], "calls": len(calls),
                                                     "error": error}))
    dist.destroy_process_group()


def test_check_runs_on_rank0_and_every_rank_gets_its_result(small_manifest, tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(2, init, str(small_manifest), str(tmp_path / "home"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert r0["kept"] == r1["kept"] == ["ok.png", "ok.jpg", "cut.png"]
    assert (r0["calls"], r1["calls"]) == (2, 0)  # the other rank never checked
    assert r0["error"] == r1["error"] and r1["error"].startswith("2 of 5 records are unusable")
