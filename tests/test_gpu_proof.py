"""benchmarks/gpu_proof.py: its helpers (default tier) and the whole `--cpu-smoke` run (slow, ~3 minutes)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_proof", REPO / "benchmarks" / "gpu_proof.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_folder_check_sees_empty_and_missing_tensors(stage2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    gp = _load()
    same = gp.compare_stage_folders(stage2_dir, stage2_dir)
    assert same["full_shapes"] and same["tensors"] > 0
    broken = tmp_path / "stage2"
    shutil.copytree(stage2_dir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    sd = load_file(str(broken / "trained.safetensors"))
    first = sorted(sd)[0]
    sd[first] = sd[first].new_empty((0,))  # what ZeRO-3 placeholders look like when written ungathered
    save_file(sd, str(broken / "trained.safetensors"))
    bad = gp.compare_stage_folders(stage2_dir, broken)
    assert not bad["full_shapes"] and bad["empty"] == [f"trained.safetensors:{first}"]


def test_table_compares_against_the_baseline():
    gp = _load()
    results = {"parts": {
        "base": {"status": "ok", "params": 7.9e9, "dtype": "bfloat16", "layers": 0, "wall_s": 40.0},
        "s2": {"status": "ok", "wall_s": 50.0, "samples_s": 22.1, "peak_gib": 30.0, "loss_first": 10.4,
               "loss_last": 9.0},
        "baseline": {"status": "ok", "wall_s": 120.0, "result": {
            "train": {"B": 16, "T": 176, "samples_s": 44.2, "peak_gib": 36.5},
            "gen_b1": {"batch": 1, "s": 12.7, "reports_s": 0.08},
            "gen_b64": {"batch": 64, "s": 13.1, "reports_s": 4.87}}},
        "gen": {"status": "ok", "new_tokens": 100, "wall_s": 30.0,
                "b1": {"batch": 1, "s": 6.35, "reports_s": 0.16, "prompt_tokens": 120, "peak_gib": 15.0}},
        "z3_s1": {"status": "skipped", "reason": "deepspeed is not installed"},
    }}
    lines = {line.split()[0] + (" " + line.split()[1] if line.startswith("baseline") else ""): line
             for line in gp.table(results).splitlines()[2:]}
    assert "0.5x" in lines["s2"]  # 22.1 / 44.2 samples/s
    assert "2.0x" in lines["gen_b1"]  # 0.16 / 0.08 reports/s
    assert "skipped" in lines["z3_s1"] and "deepspeed is not installed" in lines["z3_s1"]
    assert "7.90B params" in lines["base"]


BASELINE_STUB = '''
import json, os
res = {"train": {"B": 2, "T": 176, "step_s": 1.0, "samples_s": 2.0, "tflops": 0.1, "peak_gib": 0.0, "loss": 10.4},
       "gen_b1": {"batch": 1, "s": 4.0, "new_tokens_s": 25.0, "reports_s": 0.25},
       "gen_b64": {"batch": 64, "s": 8.0, "new_tokens_s": 800.0, "reports_s": 8.0}}
assert os.environ.get("TINY") == "1"
json.dump(res, open(os.path.join(os.environ["OUT"], "baseline_llama.json"), "w"))
'''


@pytest.mark.slow
@pytest.mark.distributed  # CI runs the distributed tier: the smoke launches DeepSpeed ranks like the GPU proof
def test_cpu_smoke_runs_every_part_it_can(tmp_path):
    # The real baseline takes ~6 minutes on 2 cores even in its TINY mode; a stand-in that writes its JSON
    # format keeps the side-by-side code path (run, parse, ratios) under test.
    stub = tmp_path / "baseline_stub.py"
    stub.write_text(BASELINE_STUB)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "--cpu-smoke", "--out", str(out),
                           "--baseline", str(stub)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_proof.json").read_text())
    parts = res["parts"]
    assert res["mode"] == "cpu-smoke" and res["settings"]["layers"] == 1
    assert parts["base"]["status"] == "ok" and 0.5e9 < parts["base"]["params"] < 0.6e9  # 4096-wide, 1 layer
    for name in ("s1", "s2", "merge", "decode", "gen", "baseline"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["decode"]["same_tokens"] and (out / "decode_speed.json").is_file()
    assert parts["s1"]["samples_s"] > 0 and parts["s2"]["peak_gib"] > 0
    assert parts["merge"]["peak_host_gib"] > 1.0 and parts["merge"]["max_abs_logit_diff"] < 1.0
    assert parts["gen"]["b1"]["reports_s"] > 0 and parts["gen"]["b4"]["prompt_tokens"] > 64  # 2 views = 64
    for name in ("z3_s1", "z3_s2", "z2_s1", "z2_s2", "q4_s2"):
        pkg = "bitsandbytes" if name.startswith("q") else "deepspeed"
        if importlib.util.find_spec(pkg) is None:
            assert parts[name]["status"] == "skipped" and pkg in parts[name]["reason"]
        else:
            assert parts[name]["status"] == "ok", (name, parts[name])
    text = (out / "gpu_proof.txt").read_text()
    assert "baseline train" in text and "x" in text.split("\ns1 ")[1].split("\n")[0]  # s1 vs baseline ratio
    assert "===== s1" in (out / "gpu_proof_logs.txt").read_text()
