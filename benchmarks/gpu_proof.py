"""The GPU proof in one command: the shipped vicuna7b stages at full depth in bf16, against plain HF + PEFT.

On a GPU machine (see ../shared/docs/GPU.md), in one call of at most 8 minutes (--budget-s):

    base        shape-vicuna7b at full depth (7.9B, random weights), built in bf16 on the GPU and saved once;
                every stage 1 below starts from that folder (model.base=<folder>)
    s1, s2      configs/vicuna7b/stage1.yaml -> stage2.yaml, a few dozen optimizer steps each, synthetic data
    baseline    ../shared/gpu/baseline_hf_peft.py, side by side in the same call (its own JSON is kept)
    merge       `clinicalblip merge` of the s1 -> s2 chain (bf16 release): time and peak host memory
    decode      benchmarks/decode_speed.py's GPU mode on the release: plain generate vs the compiled
                static-cache decode path, batch 1 and 64, same run (decode_speed.json)
    gen_b1/b64  greedy generation from the release, batch 1 and 64, a fixed number of new tokens
    z3_s1/z3_s2 the same two stages under DeepSpeed ZeRO-3 (accelerate launch, configs/accelerate/zero3.yaml,
                --num_processes 1); z3_s2 chains from z3_s1. Stage folders are checked for full-shape tensors.
    q4_s2       stage 2 with model.quantization=4bit (QLoRA) from the s1 parent
    z2_s1/z2_s2 the same under ZeRO-2
Parts run in that order (most important first); a part that would not fit in what is left of --budget-s is
skipped and said so. Results are written after every part, so a killed run still leaves its JSON.

Prints one table and writes gpu_proof.json, gpu_proof.txt (the table) and gpu_proof_logs.txt (each part's
log, head and tail) under --out (default $OUT, else runs/bench/gpu_proof). Exit code 1 if a part failed.

    --cpu-smoke   the same code on the CPU with model.layers: 1 and tiny step counts (CI keeps it from
                  rotting). ZeRO parts need deepspeed and the 4-bit part bitsandbytes; each is skipped, and
                  says so, where its package is missing. The baseline (about 6 minutes on 2 cores even in its
                  TINY mode) runs only when --baseline names a script explicitly.

A device command, from the repository root (wheels fetched once with ../shared/gpu/fetch-wheels.sh, `.whl`
carried along):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/gpu_proof.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = "shape-vicuna7b"
DEFAULT_BASELINE = REPO.parent / "shared" / "gpu" / "baseline_hf_peft.py"
ORDER = ["s1", "s2", "baseline", "merge", "decode", "gen", "z3_s1", "z3_s2", "q4_s2", "z2_s1", "z2_s2"]
TRAIN_PARTS = {  # name: (stage yaml, parent part, launcher, extra overrides)
    "s1": ("stage1.yaml", None, None, []),
    "s2": ("stage2.yaml", "s1", None, []),
    "z3_s1": ("stage1.yaml", None, "zero3", []),
    "z3_s2": ("stage2.yaml", "z3_s1", "zero3", []),
    "q4_s2": ("stage2.yaml", "s1", None, ["model.quantization=4bit"]),
    "z2_s1": ("stage1.yaml", None, "zero2", []),
    "z2_s2": ("stage2.yaml", "z2_s1", "zero2", []),
}


# ---------------------------------------------------------------------------------------------- settings
def settings(args) -> dict:
    """Everything that differs between the GPU run and the CPU smoke: sizes only, never code paths."""
    if args.cpu_smoke:
        s = {"device": "cpu", "layers": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "n_studies": 24,
             "val_max": 1, "gen_batches": [1, 4], "new_tokens": 4, "budget_s": float("inf")}
    else:
        s = {"device": "cuda", "layers": 0, "steps": 24, "batch_size": 8, "grad_accum": 2, "n_studies": 240,
             "val_max": 16, "gen_batches": [1, 64], "new_tokens": 100, "budget_s": 480.0}
    for key in ("layers", "steps", "batch_size", "grad_accum", "budget_s", "new_tokens"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    return s


def missing_package(part: str) -> str | None:
    """Why a part cannot run here (a package it needs is not importable), or None."""
    if part.startswith("z") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'clinicalblip[gpu]', or the GPU wheels)"
    if part.startswith("q4") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'clinicalblip[gpu]', or the GPU wheels)"
    return None


# ---------------------------------------------------------------------------------------------- running
def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run a command (its own process group), output to a log; wall time, exit code and the peak RSS of the
    command and its descendants (wait4), killed when it outlives `timeout`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
                killed = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "killed_for_time": killed,
            "peak_host_gib": round(usage.ru_maxrss / 2**20, 2)}


def log_excerpt(log: Path, head: int = 15, tail: int = 40) -> str:
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines() if log.is_file() else []
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) <= head + tail:
        return "\n".join(lines)
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} lines) ..."] + lines[-tail:])


def train_metrics(stage_dir: Path) -> dict:
    """Median samples/s over the logged steps after the first (warm-up), peak memory, last loss."""
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    rows = [r for r in rows if "samples_per_s" in r]
    if not rows:
        return {}
    steady = rows[1:] or rows
    return {"samples_s": round(statistics.median(r["samples_per_s"] for r in steady), 3),
            "peak_gib": round(max(r["peak_mem_gib"] for r in rows), 2),
            "loss_first": round(rows[0]["loss"], 4), "loss_last": round(rows[-1]["loss"], 4),
            "steps_logged": len(rows)}


def stage_tensor_shapes(stage_dir: Path) -> dict:
    """name -> shape of every tensor a stage folder holds (safetensors headers only; nothing loaded)."""
    from safetensors import safe_open

    shapes = {}
    for f in (stage_dir / "trained.safetensors", stage_dir / "adapter" / "adapter_model.safetensors"):
        if f.is_file():
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[f"{f.name}:{k}"] = tuple(st.get_slice(k).get_shape())
    return shapes


def compare_stage_folders(ref: Path, other: Path) -> dict:
    """A ZeRO stage folder against the plain one: same tensors, full (non-empty) shapes."""
    a, b = stage_tensor_shapes(ref), stage_tensor_shapes(other)
    empty = [k for k, s in b.items() if 0 in s or len(s) == 0]
    differ = sorted(set(a) ^ set(b)) + [k for k in set(a) & set(b) if a[k] != b[k]]
    return {"tensors": len(b), "empty": empty[:5], "differ_from_plain": differ[:5],
            "full_shapes": bool(b) and not empty and not differ}


# ---------------------------------------------------------------------------------------------- parts
def build_base(work: Path, s: dict, manifest: Path) -> dict:
    """shape-vicuna7b in its real shapes (model.layers cut only in the smoke), saved once as a folder."""
    import torch

    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.shapes import build_shape_model, build_shape_processor

    t0 = time.perf_counter()
    corpus = [r[k] for r in read_manifest(str(manifest)) for k in ("findings", "impression", "indication")
              if r.get(k)]
    processor = build_shape_processor(PRESET, corpus=corpus)
    dtype = torch.bfloat16 if s["device"] == "cuda" else torch.float32
    model = build_shape_model(PRESET, layers=s["layers"], dtype=dtype, device=s["device"])
    t_build = time.perf_counter() - t0
    out = work / "base"
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if s["device"] == "cuda":
        torch.cuda.empty_cache()
    return {"status": "ok", "params": n, "dtype": str(dtype).replace("torch.", ""), "layers": s["layers"],
            "build_s": round(t_build, 1), "wall_s": round(time.perf_counter() - t0, 1), "dir": str(out)}


def train_part(name: str, work: Path, s: dict, manifest: Path, timeout: float) -> dict:
    yaml_name, parent, launcher, extra = TRAIN_PARTS[name]
    out = work / name
    cmd = [sys.executable, "-m", "clinicalblip", "train"]
    if launcher:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / f"{launcher}.yaml"), "--num_processes", "1",
               "-m", "clinicalblip", "train"]
    cmd += [str(REPO / "configs" / "vicuna7b" / yaml_name), f"output_dir={out}", f"data.manifest={manifest}",
            f"train.max_steps={s['steps']}", f"train.batch_size={s['batch_size']}",
            f"train.grad_accum={s['grad_accum']}", f"data.val_max={s['val_max']}", "train.log_every=1",
            "train.save_every=0", "train.resume=none", "data.cache_images=true"]
    cmd += [f"parent={work / parent}"] if parent else [f"model.base={work / 'base'}", "parent=null"]
    cmd += extra
    res = run_logged(cmd, work / "logs" / f"{name}.log", timeout)
    res["status"] = "ok" if res["rc"] == 0 and (out / "stage.json").is_file() else "failed"
    res.update(train_metrics(out))
    if res["status"] == "ok" and launcher:
        ref = work / ("s1" if yaml_name == "stage1.yaml" else "s2")
        if (ref / "stage.json").is_file():
            res["stage_folder"] = compare_stage_folders(ref, out)
            if not res["stage_folder"]["full_shapes"]:
                res["status"] = "failed"
    return res


def merge_part(work: Path, timeout: float) -> dict:
    release = work / "release"
    cmd = [sys.executable, "-m", "clinicalblip", "merge", str(work / "s2"), "--out", str(release), "--dtype", "bf16"]
    res = run_logged(cmd, work / "logs" / "merge.log", timeout)
    res["status"] = "ok" if res["rc"] == 0 and (release / "config.json").is_file() else "failed"
    if res["status"] == "ok":
        meta = json.loads((release / "clinicalblip.json").read_text())
        res["max_abs_logit_diff"] = meta["verification"]["max_abs_logit_diff"]
        res["release_gib"] = round(sum(f.stat().st_size for f in release.glob("*.safetensors")) / 2**30, 2)
    return res


def gen_part(work: Path, s: dict, manifest: Path) -> dict:
    """Greedy generation from the release at each batch size, a fixed number of new tokens (as the baseline)."""
    import torch

    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.generate import ReportModel

    cuda = s["device"] == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rm = ReportModel.load(str(work / "release"), dtype="bf16", device=s["device"])
    records = [r for r in read_manifest(str(manifest)) if r["split"] == "test"]
    collate = rm.collator()
    out = {"status": "ok", "new_tokens": s["new_tokens"]}
    for b in s["gen_batches"]:
        batch = collate([records[i % len(records)] for i in range(b)])
        n = s["new_tokens"]
        rm.generate_batch(batch, max_new_tokens=min(5, n), min_new_tokens=min(5, n))  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        rm.generate_batch(batch, max_new_tokens=n, min_new_tokens=n)
        sync()
        dt = time.perf_counter() - t
        out[f"b{b}"] = {"batch": b, "s": round(dt, 3), "reports_s": round(b / dt, 3),
                        "new_tokens_s": round(b * n / dt, 1), "prompt_tokens": int(batch["input_ids"].shape[1]),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    del rm
    if cuda:
        torch.cuda.empty_cache()
    return out


def decode_part(work: Path, s: dict, out_dir: Path) -> dict:
    """benchmarks/decode_speed.py's GPU mode on the release: plain generate against the compiled static-cache
    decode path, batch 1 and 64, the same new tokens, in this call (decode_speed.json beside gpu_proof.json)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decode_speed

    cuda = s["device"] == "cuda"
    rows = decode_speed.gpu_rows(str(work / "release"), out_dir, new_tokens=s["new_tokens"],
                                 batches=(1, 64) if cuda else (1, 2), presets=(), device=s["device"])
    by_b = {r["batch"]: r for r in rows if r["compile"] == cuda}
    b1 = by_b.get(1, {})
    return {"status": "ok", "rows": rows,
            "b1_s_per_report_ours": round(b1["ours_ms_per_token"] * s["new_tokens"] / 1000, 3) if b1 else None,
            "speedup_by_batch": {b: r["speedup"] for b, r in by_b.items()},
            "same_tokens": rows[0]["same_tokens"] if rows else None}


def baseline_part(work: Path, script: Path, timeout: float, tiny: bool) -> dict:
    bdir = work / "baseline"
    bdir.mkdir(exist_ok=True)
    env = dict(os.environ, OUT=str(bdir), B=os.environ.get("B", "16"))
    if tiny:
        env["TINY"] = "1"
    res = run_logged([sys.executable, str(script)], work / "logs" / "baseline.log", timeout, env=env)
    f = bdir / "baseline_llama.json"
    res["status"] = "ok" if res["rc"] == 0 and f.is_file() else "failed"
    if f.is_file():
        res["result"] = json.loads(f.read_text())
    return res


# ---------------------------------------------------------------------------------------------- report
def _ratio(ours, theirs):
    return round(ours / theirs, 2) if ours and theirs else None


def table(results: dict) -> str:
    parts = results["parts"]
    base = (parts.get("baseline") or {}).get("result") or {}
    rows = [("part", "status", "wall s", "samples/s", "reports/s", "peak GiB", "vs baseline", "note")]
    for name in ["base"] + ORDER:
        r = parts.get(name)
        if r is None:
            continue
        if name == "gen" and r.get("status") == "ok":
            for key in sorted((k for k in r if k.startswith("b") and k[1:].isdigit()), key=lambda k: int(k[1:])):
                g = r[key]
                ref = (base.get(f"gen_b{g['batch']}") or {}).get("reports_s")
                rows.append((f"gen_b{g['batch']}", "ok", f"{g['s']:.1f}", "", f"{g['reports_s']:.3f}",
                             "" if g["peak_gib"] is None else f"{g['peak_gib']:.1f}",
                             "" if not ref else f"{_ratio(g['reports_s'], ref)}x",
                             f"{r['new_tokens']} new tokens, prompt {g['prompt_tokens']}"))
            continue
        if name == "baseline" and base:
            tr = base.get("train", {})
            rows.append(("baseline train", r["status"], f"{r['wall_s']:.0f}", f"{tr.get('samples_s', '')}", "",
                         f"{tr.get('peak_gib', '')}", "1.0x", f"B={tr.get('B')}, {tr.get('T')} tokens"))
            for key in ("gen_b1", "gen_b64"):
                g = base.get(key, {})
                if g:
                    rows.append((f"baseline {key}", "ok", f"{g['s']:.1f}", "", f"{g['reports_s']}", "", "1.0x",
                                 "100 new tokens"))
            continue
        note = r.get("reason") or r.get("note") or ""
        if name in TRAIN_PARTS and r.get("status") == "ok":
            note = f"loss {r.get('loss_first')} -> {r.get('loss_last')}"
            if "stage_folder" in r:
                note += f"; {r['stage_folder']['tensors']} tensors, full shapes {r['stage_folder']['full_shapes']}"
        if name == "merge" and r.get("status") == "ok":
            note = (f"peak host {r['peak_host_gib']} GiB, release {r['release_gib']} GiB, "
                    f"|dlogit| {r['max_abs_logit_diff']:.2g}")
        if name == "base" and r.get("status") == "ok":
            note = f"{r['params'] / 1e9:.2f}B params, {r['dtype']}, layers {r['layers'] or 'full'}"
        sps = r.get("samples_s")
        ref = (base.get("train") or {}).get("samples_s")
        peak = r.get("peak_gib")
        rows.append((name, r.get("status", ""), f"{r['wall_s']:.0f}" if "wall_s" in r else "",
                     "" if sps is None else f"{sps:.2f}", "", "" if peak is None else f"{peak:.1f}",
                     f"{_ratio(sps, ref)}x" if sps and ref else "", note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="same code on CPU, model.layers 1, tiny step counts")
    ap.add_argument("--out", help="where the JSON and table go (default $OUT, else runs/bench/gpu_proof)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--parts", help=f"comma-separated subset of {','.join(ORDER)} (default: all)")
    ap.add_argument("--steps", type=int, help="optimizer steps per stage (GPU default 24, smoke 1)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--layers", type=int, help="model.layers of the base (GPU default 0 = full depth, smoke 1)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per generated report (GPU 100, smoke 4)")
    ap.add_argument("--budget-s", type=float, help="skip parts that would end after this (GPU default 480)")
    ap.add_argument("--baseline", help=f"baseline script (GPU default {DEFAULT_BASELINE}; smoke: none)")
    args = ap.parse_args(argv)

    s = settings(args)
    t_start = time.perf_counter()
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "bench" / "gpu_proof")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="gpu_proof_")
    work = Path(args.work or tmp.name)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    wanted = [p.strip() for p in args.parts.split(",")] if args.parts else list(ORDER)
    unknown = [p for p in wanted if p not in ORDER]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)} (known: {', '.join(ORDER)})")

    import torch

    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    baseline = Path(args.baseline) if args.baseline else (None if args.cpu_smoke else DEFAULT_BASELINE)
    results = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "settings": dict(s), "preset": PRESET,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                           "cpus": os.cpu_count()},
               "parts": {}}
    if results["settings"]["budget_s"] == float("inf"):
        results["settings"]["budget_s"] = None
    parts = results["parts"]
    logs_file = out_dir / "gpu_proof_logs.txt"

    def save():
        (out_dir / "gpu_proof.json").write_text(json.dumps(results, indent=1, default=str))
        (out_dir / "gpu_proof.txt").write_text(table(results) + "\n")
        with open(logs_file, "w") as fh:
            for log in sorted((work / "logs").glob("*.log")):
                fh.write(f"===== {log.stem}\n{log_excerpt(log)}\n\n")

    budget = s["budget_s"]
    hard_stop = (budget + 60.0) if budget != float("inf") else float("inf")

    def left() -> float:
        return hard_stop - (time.perf_counter() - t_start)

    def estimate(part: str) -> float:
        done = [r["wall_s"] for n, r in parts.items() if n in TRAIN_PARTS and "wall_s" in r]
        train = max(done) if done else 60.0
        return {"baseline": 150.0, "merge": 2.0 * train, "gen": 60.0, "decode": 150.0}.get(part, 1.2 * train + 20.0)

    from clinicalblip.data.synth import write_synthetic_dataset

    manifest = write_synthetic_dataset(work / "data", n=s["n_studies"], seed=0)
    try:
        parts["base"] = build_base(work, s, manifest)
    except Exception as exc:  # nothing else can run without a base
        parts["base"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        save()
        print(table(results))
        return 1
    save()
    for name in ORDER:
        if name not in wanted:
            continue
        why = missing_package(name)
        needs = {"s2": "s1", "merge": "s2", "gen": "merge", "decode": "merge", "z3_s2": "z3_s1", "z2_s2": "z2_s1",
                 "q4_s2": "s1"}
        if not why and name in needs and parts.get(needs[name], {}).get("status") != "ok":
            why = f"needs {needs[name]}, which did not run or failed"
        if not why and name == "baseline" and baseline is None:
            why = ("not run on CPU: even in its TINY mode it generates 100 tokens at batches up to 64 with beams "
                   "(about 6 minutes on 2 cores); pass --baseline to run it")
        if not why and name == "baseline" and not baseline.is_file():
            why = f"baseline script not found at {baseline}"
        elapsed = time.perf_counter() - t_start
        if not why and elapsed + estimate(name) > budget:
            why = f"time budget: {elapsed:.0f} s used, about {estimate(name):.0f} s needed, budget {budget:.0f} s"
        if why:
            parts[name] = {"status": "skipped", "reason": why}
            print(f"[gpu_proof] {name}: skipped ({why})", flush=True)
            save()
            continue
        print(f"[gpu_proof] {name} ...", flush=True)
        try:
            if name in TRAIN_PARTS:
                parts[name] = train_part(name, work, s, manifest, timeout=left())
            elif name == "merge":
                parts[name] = merge_part(work, timeout=left())
            elif name == "decode":
                t0 = time.perf_counter()
                parts[name] = decode_part(work, s, out_dir)
                parts[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            elif name == "gen":
                t0 = time.perf_counter()
                parts[name] = gen_part(work, s, manifest)
                parts[name]["wall_s"] = round(time.perf_counter() - t0, 1)
                if s["device"] == "cuda":
                    import shutil

                    shutil.rmtree(work / "release", ignore_errors=True)  # 16 GB of disk the 4-bit part needs
            elif name == "baseline":
                parts[name] = baseline_part(work, baseline, timeout=left(), tiny=args.cpu_smoke)
        except Exception as exc:
            parts[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        print(f"[gpu_proof] {name}: {parts[name].get('status')} ({parts[name].get('wall_s', '?')} s)", flush=True)
        save()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(table(results))
    print(f"wrote {out_dir / 'gpu_proof.json'} ({results['wall_s']} s)")
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r.get("status") == "failed" for r in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
