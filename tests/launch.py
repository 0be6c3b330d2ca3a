"""Run `clinicalblip train` in subprocesses: one process, or under `accelerate launch` (DDP / DeepSpeed on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# How users launch each backend (configs/accelerate/*.yaml); 2 processes over gloo on a CPU.
LAUNCHERS = {
    "ddp": ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", "2"],
    "zero2": ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/zero2.yaml"), "--num_processes", "2"],
    "zero3": ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/zero3.yaml"), "--num_processes", "2"],
    "zero3_offload": ACCELERATE + ["--config_file", str(REPO / "configs/accelerate/zero3_offload.yaml"),
                                   "--num_processes", "2"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(extra: dict | None = None) -> dict:
    # one thread: multithreaded CPU kernels (e.g. attention backward) reduce in a timing-dependent order
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    env.update(extra or {})
    return env


def train_cmd(args, launcher: list[str] | None = None) -> list[str]:
    return (launcher or [sys.executable]) + ["-m", "clinicalblip", "train", *map(str, args)]


def train(args, env_extra: dict | None = None, launcher: list[str] | None = None, cwd=None, timeout: int = 900):
    """Run one stage to completion; the CompletedProcess (stdout/stderr captured)."""
    if launcher and launcher[: len(ACCELERATE)] == ACCELERATE and "--main_process_port" not in launcher:
        launcher = launcher + ["--main_process_port", str(free_port())]
    return subprocess.run(train_cmd(args, launcher), env=train_env(env_extra), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)


def weights(stage: Path) -> dict:
    """Every tensor a stage folder holds (full components and LoRA), keyed by file and name."""
    out = {}
    for f in ("trained.safetensors", "adapter/adapter_model.safetensors"):
        if (stage / f).is_file():
            out.update({f"{f}:{k}": v for k, v in load_file(str(stage / f)).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(stage: Path) -> list[float]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
