"""Host RAM and wall time of every step of a full-depth stage chain on the CPU, one child process per step.

Steps (shape-true random weights of the real checkpoint, `model.layers=0` = the real depth by default):

    base      build the base in the training dtype and save it (what stage 1 does first)
    stage1    stage 1 (configs/<family>/stage1.yaml): load the saved base, one step at batch 1 with 2 views
    write1    write the stage 1 folder (measured inside the stage 1 process: its peak RSS reset before)
    stage2    stage 2 as a child of stage 1 (LLM LoRA): load the parent chain, one step
    write2    write the stage 2 folder
    merge     `merge` the chain into a release in the base's stored dtype (bf16), verified against the chain
    reload    load the release with plain transformers (dtype="auto") and run the probe batch once

Each step's peak RSS is the child's own high-water mark (wait4's ru_maxrss; for the write steps the VmHWM of
the training process after resetting it through /proc/self/clear_refs), so peaks of different steps never mix.
`weights_gib` is the model's size in the training dtype.

It also runs, at `model.layers=2` with 2 ranks over gloo (`accelerate launch`, configs/accelerate/cpu.yaml and
zero3.yaml), stage 1 and stage 2 under DDP and ZeRO-3 and reports each rank's peak RSS as a fraction of the
single-process model size at that depth (`--no-ranks` skips this).

    python benchmarks/host_memory.py [--preset shape-vicuna7b|shape-flant5xl] [--layers 0] [--out DIR]
                                     [--work DIR] [--steps base,stage1,...] [--no-ranks]

Writes host_memory.json to --out, else $OUT, else runs/bench/:
{"results": [{"step", "peak_rss_gib", "wall_s", "ok"}...], "weights_gib": ..., "ranks": [...]}.
Run the full depth alone (about 15 GiB at 7B); on a shared machine, under a lock (flock) with other heavy jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAMILY = {"shape-vicuna7b": "vicuna7b", "shape-flant5xl": "flant5xl", "tiny": "tiny"}  # tiny: a smoke test
STEPS = ("base", "stage1", "stage2", "merge", "reload")
# One optimizer step at batch 1 with 2 views; no validation, no checkpoint: the stage's own memory only.
SHORT = ["train.max_steps=1", "train.batch_size=1", "train.grad_accum=1", "data.max_views=2", "data.val_max=0",
         "data.limit=2", "train.save_every=0", "train.log_every=1", "data.max_report_tokens=32",
         "data.check_images=exists"]
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------- in a child
def hwm_gib() -> float:
    """This process's peak RSS since start or the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
        return True
    except OSError:
        return False


def stage_cfg(work: Path, preset: str, layers: int, name: str, extra: list[str]):
    import yaml

    from clinicalblip.config import stage_config_from_dict

    data = yaml.safe_load((REPO / "configs" / FAMILY[preset] / f"{name}.yaml").read_text())
    data["data"]["manifest"] = str(work / "data" / "manifest.jsonl")
    data["output_dir"] = str(work / name)
    over = SHORT + [f"model.layers={layers}"] + list(extra)
    over += [f"model.base={preset}"] if name == "stage1" else [f"parent={work / 'stage1'}"]
    return stage_config_from_dict(data, over)


def child_base(work: Path, preset: str, layers: int) -> dict:
    """Build the base in the training dtype and save it where stage 1 looks for it (as train does)."""
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.model import build_base
    from clinicalblip.train import _corpus

    cfg = stage_cfg(work, preset, layers, "stage1", [])
    records = [r for r in read_manifest(cfg.data.manifest) if r.get("split") == cfg.data.train_split]
    model, processor = build_base(preset, dtype=cfg.model.dtype, corpus=_corpus(records), seed=cfg.train.seed,
                                  layers=layers)
    saved = Path(cfg.output_dir) / "base"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": cfg.model.dtype}


def child_train(work: Path, preset: str, layers: int, name: str, extra: list[str]) -> dict:
    """One stage; the write of the stage folder measured apart (peak reset before it)."""
    import clinicalblip.train as train

    phases: dict = {"import_rss_gib": hwm_gib()}  # python + torch + transformers, before any model
    t0 = time.perf_counter()
    write = train.write_stage

    def timed_write(*a, **k):
        phases["train"] = {"peak_rss_gib": hwm_gib(), "wall_s": time.perf_counter() - t0}
        phases["write_reset"] = reset_hwm()
        t1 = time.perf_counter()
        out = write(*a, **k)
        phases["write"] = {"peak_rss_gib": hwm_gib(), "wall_s": time.perf_counter() - t1}
        return out

    train.write_stage = timed_write
    train.train_stage(stage_cfg(work, preset, layers, name, extra))
    return phases


def child_merge(work: Path) -> dict:
    from clinicalblip.merge import merge_stage_chain

    info = merge_stage_chain(str(work / "stage2"), str(work / "release"))  # dtype: the base's stored dtype
    return {"dtype": info["dtype"], "max_abs_logit_diff": info["max_abs_logit_diff"],
            "tolerance": info["tolerance"], "weights_bytes": info["weights_bytes"]}


def child_reload(work: Path) -> dict:
    import tempfile

    import torch
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from clinicalblip.merge import _probe_batch
    from clinicalblip.model import is_decoder_only
    from clinicalblip.release import release_template

    release = work / "release"
    model = InstructBlipForConditionalGeneration.from_pretrained(release, dtype="auto").eval()
    processor = InstructBlipProcessor.from_pretrained(release)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        batch = _probe_batch(processor, release_template(release), is_decoder_only(model), Path(tmp))
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        logits = model(**batch).logits
    return {"dtype": str(model.dtype).replace("torch.", ""), "finite": bool(torch.isfinite(logits).all())}


def child_rank(work: Path, preset: str, layers: int, name: str, tag: str) -> None:
    """One stage under accelerate launch: every rank writes its own peak RSS."""
    phases = child_train(work, preset, layers, name, [f"output_dir={work / f'{name}-{tag}'}"]
                         + ([f"parent={work / f'stage1-{tag}'}"] if name == "stage2" else []))
    rank = int(os.environ.get("RANK", "0"))
    out = {"rank": rank, "peak_rss_gib": max(hwm_gib(), phases.get("train", {}).get("peak_rss_gib", 0.0)),
           **phases}
    (work / f"rank-{name}-{tag}-{rank}.json").write_text(json.dumps(out))


def run_child(argv: list[str], env: dict, log: Path, timeout: float | None = None) -> tuple[int, float, float]:
    """(returncode, peak RSS GiB of that child and its waited-for descendants, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024 / GIB, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- parent
def child_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(REPO),
                TOKENIZERS_PARALLELISM="false")


def run_steps(args, work: Path, preset: str, layers: int, steps: list[str]) -> tuple[list[dict], dict]:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--preset", preset, "--layers", str(layers), "--work", str(work)]
    results, facts = [], {}
    for step in steps:
        info_file = work / f"{step}.info.json"
        info_file.unlink(missing_ok=True)
        rc, peak, wall = run_child(me + ["--child", step, *common], child_env(), work / f"{step}.log")
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        facts[step] = info
        ok = rc == 0 and bool(info)
        if step in ("stage1", "stage2") and "write" in info:
            tr, wr = info["train"], info["write"]
            # the stage's wall time: the whole child (imports, load, step) but the write
            results.append({"step": step, "peak_rss_gib": round(tr["peak_rss_gib"], 2),
                            "wall_s": round(wall - wr["wall_s"], 1), "ok": ok})
            results.append({"step": "write" + step[-1], "peak_rss_gib": round(wr["peak_rss_gib"], 2),
                            "wall_s": round(wr["wall_s"], 1), "ok": ok,
                            "peak_reset": info.get("write_reset", False)})
        else:
            results.append({"step": step, "peak_rss_gib": round(peak, 2), "wall_s": round(wall, 1), "ok": ok})
        print(f"{step:<8} rc={rc} peak {peak:6.2f} GiB  {wall:7.1f} s", flush=True)
        if not ok:
            print((work / f"{step}.log").read_text()[-3000:], file=sys.stderr)
            break
    return results, facts


def run_ranks(args, work: Path, preset: str, layers: int) -> dict:
    """Single process vs 2 ranks (DDP, ZeRO-3) at a small depth: per-rank peak / single-process model size."""
    from tests.launch import ACCELERATE, free_port

    work.mkdir(parents=True, exist_ok=True)
    from clinicalblip.data.synth import write_synthetic_dataset

    write_synthetic_dataset(work / "data", n=8, seed=3)
    single, facts = run_steps(args, work, preset, layers, ["base", "stage1", "stage2"])
    model_gib = facts["base"]["weights_bytes"] / GIB
    rows = [{"backend": "single", "stage": r["step"], "rank": 0, "peak_rss_gib": r["peak_rss_gib"],
             "import_rss_gib": round(facts[r["step"]]["import_rss_gib"], 2),
             "fraction_of_model": round(r["peak_rss_gib"] / model_gib, 2),
             "fraction_above_import": round((r["peak_rss_gib"] - facts[r["step"]]["import_rss_gib"]) / model_gib, 2)}
            for r in single if r["step"] in ("stage1", "stage2")]
    me = str(Path(__file__).resolve())
    for tag, cfg_file in (("ddp", "cpu.yaml"), ("zero3", "zero3.yaml")):
        for name in ("stage1", "stage2"):
            argv = ACCELERATE + ["--config_file", str(REPO / "configs/accelerate" / cfg_file), "--num_processes",
                                 "2", "--main_process_port", str(free_port()), me, "--child", "rank",
                                 "--stage", name, "--tag", tag, "--preset", preset, "--layers", str(layers),
                                 "--work", str(work)]
            env = dict(child_env(), OMP_NUM_THREADS="1")
            rc, peak, wall = run_child(argv, env, work / f"rank-{name}-{tag}.log")
            for rank in (0, 1):
                f = work / f"rank-{name}-{tag}-{rank}.json"
                got = json.loads(f.read_text()) if f.is_file() else None
                rows.append({"backend": tag, "stage": name, "rank": rank, "ok": rc == 0 and got is not None,
                             "peak_rss_gib": round(got["peak_rss_gib"], 2) if got else None,
                             "import_rss_gib": round(got["import_rss_gib"], 2) if got else None,
                             "fraction_of_model": round(got["peak_rss_gib"] / model_gib, 2) if got else None,
                             "fraction_above_import": round((got["peak_rss_gib"] - got["import_rss_gib"]) / model_gib,
                                                            2) if got else None,
                             "wall_s": round(wall, 1)})
            print(f"{tag:<6} {name}: rc={rc} {wall:.0f} s", flush=True)
            if rc != 0:
                print((work / f"rank-{name}-{tag}.log").read_text()[-3000:], file=sys.stderr)
    return {"layers": layers, "model_gib": round(model_gib, 3), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shape-vicuna7b", choices=sorted(FAMILY))
    ap.add_argument("--layers", type=int, default=0, help="layers per tower (0 = the real depth)")
    ap.add_argument("--out", help="folder for host_memory.json (default $OUT, else runs/bench)")
    ap.add_argument("--work", help="scratch folder (default: a fresh one under /tmp); deleted unless given")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--no-ranks", action="store_true", help="skip the 2-rank DDP / ZeRO-3 runs")
    ap.add_argument("--rank-layers", type=int, default=2, help="depth of the 2-rank runs (default 2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        work = Path(args.work)
        if args.child == "rank":
            child_rank(work, args.preset, args.layers, args.stage, args.tag)
            return 0
        fn = {"base": lambda: child_base(work, args.preset, args.layers),
              "stage1": lambda: child_train(work, args.preset, args.layers, "stage1", []),
              "stage2": lambda: child_train(work, args.preset, args.layers, "stage2", []),
              "merge": lambda: child_merge(work), "reload": lambda: child_reload(work)}[args.child]
        (work / f"{args.child}.info.json").write_text(json.dumps(fn()))
        return 0

    import tempfile

    from clinicalblip.data.synth import write_synthetic_dataset

    own_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="host_memory_"))
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: unknown step {unknown[0]!r} (steps: {', '.join(STEPS)})", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data" / "manifest.jsonl").is_file():
            write_synthetic_dataset(work / "data", n=8, seed=3)
        results, facts = run_steps(args, work, args.preset, args.layers, steps)
        weights = facts.get("base", {}).get("weights_bytes")
        report = {"preset": args.preset, "layers": args.layers, "results": results,
                  "weights_gib": round(weights / GIB, 3) if weights else None,
                  "parameters": facts.get("base", {}).get("parameters"), "facts": facts,
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
                              "load_avg": os.getloadavg()}}
        if not args.no_ranks:
            report["ranks"] = run_ranks(args, work / "ranks", args.preset, args.rank_layers)
        (out_dir / "host_memory.json").write_text(json.dumps(report, indent=2))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.preset} (layers={args.layers or 'full'}), weights {report['weights_gib']} GiB in the training dtype")
    print(f"{'step':<8} {'peak RSS GiB':>12} {'wall s':>8}  ok")
    for r in results:
        print(f"{r['step']:<8} {r['peak_rss_gib']:>12.2f} {r['wall_s']:>8.1f}  {r['ok']}")
    if "ranks" in report:
        rk = report["ranks"]
        print(f"\n2 ranks at layers={rk['layers']} (model {rk['model_gib']} GiB): peak RSS per rank / model size")
        for r in rk["rows"]:
            print(f"{r['backend']:<7} {r['stage']:<7} rank {r['rank']}  {r['peak_rss_gib']} GiB  "
                  f"{r['fraction_of_model']}x  ({r['fraction_above_import']}x above the {r['import_rss_gib']} GiB "
                  "of imports)")
    print(f"wrote {out_dir / 'host_memory.json'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
