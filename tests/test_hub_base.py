"""Hub bases are pinned: a stage on a hub id records the cached snapshot's commit and fingerprint, and a chain
whose base has moved to another revision stops. A hand-made HF cache layout; no network."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from clinicalblip.errors import UserError
from clinicalblip.model import describe_base, fingerprint, hub_snapshot
from clinicalblip.stages import load_stage_model

from conftest import tiny_stage_cfg

REV_A, REV_B = "a" * 40, "b" * 40


def _snapshot(cache: Path, rev: str, seed: int, corpus: list[str]) -> Path:
    from clinicalblip.tiny import build_tiny_model, build_tiny_processor

    repo = cache / "models--org--tiny-instructblip"
    snap = repo / "snapshots" / rev
    proc = build_tiny_processor("tiny", corpus=corpus)
    build_tiny_model(proc, "tiny", seed=seed).save_pretrained(snap)
    proc.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_hub_base_is_pinned_and_a_moved_revision_stops(synth_manifest, tmp_path, monkeypatch):
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.train import _corpus, train_stage

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = _corpus(read_manifest(synth_manifest))
    snap_a = _snapshot(cache, REV_A, seed=0, corpus=corpus)
    assert hub_snapshot("org/tiny-instructblip") == snap_a and hub_snapshot("org/unknown") is None

    out = tmp_path / "s1"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"model.base": "org/tiny-instructblip",
                                                                      "train.max_steps": 1}))
    base = json.loads((out / "stage.json").read_text())["base"]
    assert base == describe_base("org/tiny-instructblip")
    assert base["revision"] == REV_A and base["fingerprint"] == fingerprint(snap_a)
    load_stage_model(out)  # the pinned revision loads

    # upstream moves on: refs/main names revision B, revision A is gone from the cache
    _snapshot(cache, REV_B, seed=1, corpus=corpus)
    moved = tmp_path / "snap_a_aside"
    shutil.move(str(snap_a), moved)
    with pytest.raises(UserError, match=f"org/tiny-instructblip now resolves to revision {REV_B}, but stage 'stage1' "
                                        f"was trained on revision {REV_A}: fetch that revision with "
                                        f"`huggingface-cli download org/tiny-instructblip --revision {REV_A}`"):
        load_stage_model(out)
    # revision A back in the cache: the chain loads A (pinned), not refs/main's B
    shutil.move(str(moved), snap_a)
    model, _, _ = load_stage_model(out)
    assert model.config.text_config.vocab_size > 0
    # the pinned snapshot altered in place: its fingerprint no longer matches the record
    cfg = json.loads((snap_a / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3
    (snap_a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"base model at .*{REV_A} differs from the one stage 'stage1' was trained on"):
        load_stage_model(out)
    # neither revision cached: say which revision to fetch
    shutil.rmtree(cache)
    with pytest.raises(UserError, match=f"revision {REV_A} \\(stage 'stage1'\\) is not in the hub cache"):
        load_stage_model(out)


def test_push_to_hub_offline_is_refused_before_merging(stage2_dir, tmp_path, monkeypatch):
    from clinicalblip.merge import merge_stage_chain

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--push-to-hub me/model needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set"):
        merge_stage_chain(str(stage2_dir), str(tmp_path / "rel"), push_to_hub="me/model")
    assert not (tmp_path / "rel").exists()


def test_venv_script_does_not_silence_warnings(tmp_path):
    import hashlib
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    # a stand-in venv whose install stamp is current: sourcing the script installs nothing
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    lock = repo / "locks" / f"{lockfile_tag()}.txt"
    stamp = hashlib.sha256((repo / "pyproject.toml").read_bytes() + lock.read_bytes()).hexdigest()[:12]
    (venv / f".clinicalblip-{stamp}").touch()
    proc = subprocess.run(["bash", "-c", "unset PYTHONWARNINGS; source scripts/venv.sh; "
                                         "echo \"PYTHONWARNINGS=${PYTHONWARNINGS-unset} HF_HUB_OFFLINE=$HF_HUB_OFFLINE\""],
                          cwd=repo, env={"PATH": "/usr/bin:/bin", "CLINICALBLIP_VENV": str(venv)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PYTHONWARNINGS=unset HF_HUB_OFFLINE=1"


def lockfile_tag() -> str:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(repo / "scripts" / "lockfile.py"), "tag"], capture_output=True,
                          text=True, check=True).stdout.strip()
