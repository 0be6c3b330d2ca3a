"""The install: the README's venv equals the lock, and a built wheel (not editable) trains and generates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lockfile(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "lockfile.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_lock_exists_for_the_readme_python_and_is_hashed():
    tag = _lockfile("tag").stdout.strip()
    lock = REPO / "locks" / f"{tag}.txt"
    if not lock.exists():
        pytest.skip(f"no lock for {tag} (the README's commands use Python 3.11 on Linux x86_64)")
    text = lock.read_text()
    pins = [line for line in text.splitlines() if "==" in line and not line.startswith("#")]
    hashes = [line for line in text.splitlines() if line.strip().startswith("--hash=sha256:")]
    assert len(pins) == len(hashes) > 50
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "setuptools"} <= names
    assert any(line.startswith("torch==") and "+cpu" in line for line in pins)  # the CPU build, never CUDA
    constraints = (REPO / "locks" / f"{tag}-constraints.txt").read_text()
    assert "torch==" in constraints and "+cpu" not in constraints and "--hash" not in constraints


@pytest.mark.skipif(not os.environ.get("CLINICALBLIP_LOCK"), reason="not run from scripts/venv.sh (./test.sh)")
def test_the_venv_equals_the_lock():
    """./test.sh's environment is exactly the lock: every locked version installed, nothing else."""
    proc = _lockfile("verify", os.environ["CLINICALBLIP_LOCK"])
    assert proc.returncode == 0, proc.stderr


def test_verify_names_a_moved_package(tmp_path):
    """The check behind the test above fails, naming the package, when one version differs."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    pins = [line for line in freeze if "==" in line and not line.startswith("pip==")]
    moved = [("pyyaml==0.0.1" if line.lower().startswith("pyyaml==") else line) for line in pins]
    (tmp_path / "lock.txt").write_text("\n".join(moved) + "\n")
    proc = _lockfile("verify", str(tmp_path / "lock.txt"))
    assert proc.returncode == 1 and "pyyaml: locked 0.0.1, installed 6" in proc.stderr


def test_wheel_installs_and_trains_and_generates_outside_the_repo(tmp_path):
    """pip wheel . -> installed (not editable) into a fresh venv over the locked packages -> tiny train + generate
    from a folder outside the repo: the templates and the page's files come from the wheel."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("clinicalblip-*.whl"))

    # a fresh venv whose only view of the locked packages is this environment's site-packages (a .pth line adds
    # the folder but not its .pth files, so the editable install of the repo stays invisible)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "locked_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "configs" / "tiny" / "stage1.yaml", work / "stage1.yaml")  # a user's copy of a config
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLINICALBLIP_PROMPTS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    py = str(venv / "bin" / "python")

    def run(*args):
        proc = subprocess.run([py, *map(str, args)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
        return proc

    where = run("-c", "import clinicalblip, clinicalblip.prompts as p; print(clinicalblip.__file__); print(p.prompts_dir())")
    module_file, templates = where.stdout.split()
    assert module_file.startswith(str(site)) and Path(templates, "findings_with_context.yaml").is_file()
    assert Path(site, "clinicalblip", "serve", "static", "index.html").is_file()

    run("-m", "clinicalblip", "data", "synth", "--out", "data", "--n", "16", "--seed", "2")
    run("-m", "clinicalblip", "train", "stage1.yaml", "output_dir=stage1", "data.manifest=data/manifest.jsonl",
        "train.max_steps=1", "train.batch_size=4", "data.val_max=2")
    rec = json.loads((work / "data" / "manifest.jsonl").read_text().splitlines()[0])
    out = run("-m", "clinicalblip", "generate", "stage1", "--image", Path("data") / rec["images"][0]["path"],
              "--indication", "Cough.", "--max-new-tokens", "6", "--json")
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["prompt"].startswith("Indication: Cough.") and isinstance(answer["report"], str)
