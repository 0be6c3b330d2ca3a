"""Decoding speed: plain transformers `generate` against clinicalblip's decode path, same model and inputs, same run.

    python benchmarks/decode_speed.py [--model RELEASE] [--batches 1,8,64] [--new-tokens 48] [--compile]
                                      [--shapes] [--same-studies 100] [--out DIR]

Models: the demo release (`--model`, else runs/demo/release when it exists, else a tiny release trained here for
80 steps on synthetic data, as benchmarks/serve_load.py builds it) and, with --shapes, `shape-vicuna7b` and
`shape-flant5xl` at model.layers=2 (real widths and vocabularies, random weights).

For each model and batch size both paths write reports for the same studies with a fixed number of new tokens
(min_new_tokens = max_new_tokens, so neither stops early), alternating for --rounds rounds; the median is kept.
ms/token is the time of one batch divided by the new tokens (one decoding step of the whole batch, image prefix
and prefill included); reports/s is batch / time. On the CPU the clock is the process's CPU time by default
(--clock cpu): the benchmark runs with one torch thread and this machine is shared, so CPU time is what the
work costs, while wall time also counts other processes' turns (--clock wall measures that instead). On CUDA
the clock is wall time after synchronising.
"same tokens" greedy-decodes --same-studies test studies (batches of 8, natural EOS, the model's max new
tokens) with both and counts the studies whose tokens are identical.
--compile adds a row per batch for the compiled step (first-call time, compile included, reported apart).
--device cuda --dtype bf16 is the GPU mode (gpu_proof.py's `decode` part calls `gpu_rows`).

Prints a table and writes decode_speed.json under --out (default $OUT, else runs/bench):
{"results": [{"model", "batch", "hf_ms_per_token", "ours_ms_per_token", "speedup", "same_tokens": "K/N", ...}]}
Run it alone: `flock /tmp/cb-heavy.lock python benchmarks/decode_speed.py` with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _clock(kind: str, cuda: bool):
    import torch

    if cuda:
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.process_time if kind == "cpu" else time.perf_counter


def report_model(base: str, layers: int, dtype: str, device: str):
    """A ReportModel around a shape preset (random weights) without a folder on disk."""
    import torch

    from clinicalblip.generate import ReportModel
    from clinicalblip.model import build_base
    from clinicalblip.prompts import load_template

    torch.manual_seed(0)
    model, proc = build_base(base, dtype=dtype, layers=layers)
    model.to(device).eval()
    return ReportModel(model=model, processor=proc, template=load_template("findings_with_context"),
                       model_dir=f"{base}@layers={layers}")


def timed(rm, batch, n: int, decode: str, compile: bool, now) -> float:
    rm.decode, rm.compile = decode, compile
    t = now()
    rm.generate_batch(batch, max_new_tokens=n, min_new_tokens=n)
    return now() - t


def same_tokens(rm, records, n_studies: int, max_new: int, compile: bool) -> tuple[int, int]:
    """Studies whose greedy tokens (up to EOS) are identical between generate and the decode path."""
    import torch

    from clinicalblip.data.collate import model_inputs
    from clinicalblip.decode import Decoder

    collate = rm.collator()
    dec = Decoder(rm.model, compile=compile)
    pad = rm.processor.tokenizer.pad_token_id
    same = total = 0
    recs = records[:n_studies]
    for i in range(0, len(recs), 8):
        inp = {k: v.to(rm.device) for k, v in model_inputs(collate(recs[i: i + 8])).items()}
        inp["pixel_values"] = inp["pixel_values"].to(rm.model.dtype)
        with torch.no_grad():
            hf = rm.model.generate(**inp, max_new_tokens=max_new, do_sample=False)
        hf = hf[:, 1:] if not rm.decoder_only else hf[:, inp["input_ids"].shape[1]:]
        ours = dec.generate(inp, max_new_tokens=max_new)
        for a, b in zip(hf.tolist(), ours.tolist()):
            total += 1
            same += [t for t in a if t != pad] == [t for t in b if t != pad]
    return same, total


def bench(name: str, rm, records, batches, new_tokens: int, rounds: int, n_same: int, same_max_new: int,
          with_compile: bool, clock: str) -> list[dict]:
    import torch

    cuda = rm.device.type == "cuda"
    now = _clock(clock, cuda)
    collate = rm.collator()
    modes = [False] + ([True] if with_compile else [])
    same = {c: same_tokens(rm, records, n_same, same_max_new, c) for c in modes}
    rows = []
    for b in batches:
        batch = collate([records[i % len(records)] for i in range(b)])
        first = {}
        for c in modes:  # warm-up (and, compiled, the first call: compile included)
            t = time.perf_counter()
            timed(rm, batch, new_tokens, "fast", c, now)
            first[c] = time.perf_counter() - t
        timed(rm, batch, new_tokens, "hf", False, now)
        times = {"hf": []} | {c: [] for c in modes}
        for _ in range(rounds):
            times["hf"].append(timed(rm, batch, new_tokens, "hf", False, now))
            for c in modes:
                times[c].append(timed(rm, batch, new_tokens, "fast", c, now))
        hf = statistics.median(times["hf"])
        for c in modes:
            ours = statistics.median(times[c])
            k, n = same[c]
            rows.append({"model": name, "batch": b, "compile": c, "new_tokens": new_tokens,
                         "hf_ms_per_token": round(hf / new_tokens * 1000, 3),
                         "ours_ms_per_token": round(ours / new_tokens * 1000, 3),
                         "speedup": round(hf / ours, 2),
                         "hf_reports_per_s": round(b / hf, 2), "ours_reports_per_s": round(b / ours, 2),
                         "same_tokens": f"{k}/{n}", "first_call_s": round(first[c], 2) if c else None,
                         "prompt_tokens": int(batch["input_ids"].shape[1]), "rounds": rounds,
                         "clock": "wall (cuda sync)" if cuda else clock, "device": str(rm.device),
                         "dtype": str(rm.model.dtype).replace("torch.", "")})
            print(f"[decode_speed] {name} b{b}{' compiled' if c else ''}: hf {rows[-1]['hf_ms_per_token']} "
                  f"ours {rows[-1]['ours_ms_per_token']} ms/token ({rows[-1]['speedup']}x)", flush=True)
    rm.decode, rm.compile = "fast", False
    if cuda:
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | batch | step | hf ms/token | ours ms/token | speedup | hf reports/s | ours reports/s | "
            "same tokens | first call s |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {'compiled' if r['compile'] else 'eager'} | "
                     f"{r['hf_ms_per_token']} | {r['ours_ms_per_token']} | {r['speedup']}x | "
                     f"{r['hf_reports_per_s']} | {r['ours_reports_per_s']} | {r['same_tokens']} | "
                     f"{r['first_call_s'] if r['first_call_s'] is not None else '-'} |")
    return "\n".join(lines)


def test_records(n: int, workdir: Path) -> list[dict]:
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.data.synth import write_synthetic_dataset

    manifest = write_synthetic_dataset(workdir / "inputs", n=max(60, int(n / 0.15) + 20), seed=11)
    recs = read_manifest(str(manifest), split="test")
    return recs if len(recs) >= n else read_manifest(str(manifest))


def gpu_rows(release: str | None, out_dir: Path, new_tokens: int = 100, batches=(1, 64), layers: int = 0,
             presets=("shape-vicuna7b",), device: str = "cuda") -> list[dict]:
    """The GPU mode: bf16, eager and compiled step (CUDA graphs), the shape presets at `layers` (0: full depth)
    and the release if given. device="cpu" runs the same code as a smoke test."""
    import torch

    from clinicalblip.generate import ReportModel

    work = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    recs = test_records(16, work)
    rows = []
    for base in presets:
        rm = report_model(base, layers, "bf16", device)
        rows += bench(f"{base}@L{layers or 'full'}", rm, recs, batches, new_tokens, 2, 8, new_tokens, device == "cuda",
                      "wall")
        del rm
        torch.cuda.empty_cache()
    if release:
        rm = ReportModel.load(release, dtype="bf16", device=device)
        # compiled on CUDA only: a CPU compile takes minutes (the smoke run checks the code path, not speed)
        rows += bench("release", rm, recs, batches, new_tokens, 2, 8, new_tokens, device == "cuda", "wall")
    write(rows, out_dir, {"mode": f"gpu-mode on {device}"})
    return rows


def write(rows: list[dict], out_dir: Path, meta: dict) -> Path:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "decode_speed.json"
    path.write_text(json.dumps({"results": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "platform": platform.platform(), **meta}, indent=2))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a release (or stage) folder; default runs/demo/release, else a tiny one")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--same-studies", type=int, default=100)
    ap.add_argument("--shapes", action="store_true", help="also shape-vicuna7b / shape-flant5xl at --shape-layers")
    ap.add_argument("--shape-layers", type=int, default=2)
    ap.add_argument("--shape-batches", default="1,8", help="batch sizes for the shape presets (default 1,8)")
    ap.add_argument("--shape-new-tokens", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also time the compiled step")
    ap.add_argument("--only-shapes", action="store_true")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="output folder (default $OUT, else runs/bench)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "bench")
    work = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    recs = test_records(max(args.same_studies, 64), work)
    rows: list[dict] = []
    if not args.only_shapes:
        from clinicalblip.generate import ReportModel

        model = args.model or (str(REPO / "runs/demo/release") if (REPO / "runs/demo/release").is_dir() else None)
        if model is None:
            from serve_load import build_tiny_release

            print("[decode_speed] no --model and no runs/demo/release: training a tiny release (80 steps)",
                  flush=True)
            model = str(build_tiny_release(work / "tiny"))
        rm = ReportModel.load(model, dtype=args.dtype, device=args.device)
        rows += bench("demo" if "demo" in model else "tiny-release", rm, recs,
                      [int(b) for b in args.batches.split(",")], args.new_tokens, args.rounds, args.same_studies,
                      rm.max_new_tokens, args.compile, args.clock)
        write(rows, out_dir, {"mode": args.device, "model": model})
        del rm
    if args.shapes or args.only_shapes:
        for base in ("shape-vicuna7b", "shape-flant5xl"):
            rm = report_model(base, args.shape_layers, args.dtype, args.device)
            rows += bench(f"{base}@L{args.shape_layers}", rm, recs, [int(b) for b in args.shape_batches.split(",")],
                          args.shape_new_tokens, max(2, args.rounds // 2), 16, args.shape_new_tokens, args.compile,
                          args.clock)
            write(rows, out_dir, {"mode": args.device})
            del rm
    path = write(rows, out_dir, {"mode": args.device})
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
