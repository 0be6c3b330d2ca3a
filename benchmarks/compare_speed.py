"""compare speed: two systems on IU X-Ray test size (590 studies), 10,000 paired resamples of every metric.

    python benchmarks/compare_speed.py [--n 590] [--resamples 10000] [--seed 0]

References are 590 real IU X-Ray reports from ../shared/data/iu_xray_dev/annotation.json when it exists (labeled by
the CheXpert-style rules), else synthetic studies (``clinicalblip.data.synth``, its own labels). System A gives
every study another study's report; system B keeps the study's own report for 60 % of the studies and another's
for the rest, so every metric differs. The whole `clinicalblip compare` path is timed in this process: reading,
scoring both systems as `eval` does (BLEU, METEOR through Java, ROUGE-L, CIDEr-D, labeler), the sufficient
statistics, and the bootstrap + approximate-randomisation loop over all 7 + 2-3 + per-label metrics. The METEOR JVM
start is counted (measured separately too). Prints a table and writes compare_speed.json to $OUT (or ./runs/).
Acceptance: <= 60 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from clinicalblip.metrics import compare as cmp
from clinicalblip.metrics import nlg


def _studies(n: int, tmp: Path) -> tuple[list[dict], str]:
    ann = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray_dev" / "annotation.json"
    if ann.is_file():
        data = json.loads(ann.read_text())
        rows = [r for split in ("test", "val", "train") for r in data.get(split, []) if (r.get("report") or "").strip()]
        return [{"id": str(r["id"]), "reference": r["report"]} for r in rows[:n]], "IU X-Ray reports (../shared)"
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.data.synth import write_synthetic_dataset

    recs = read_manifest(write_synthetic_dataset(tmp / "synth", n=n, seed=0, image_size=16), resolve_paths=False)
    return ([{"id": r["id"], "reference": r["findings"], "dataset": "synthetic", "labels": r["labels"]} for r in recs],
            "synthetic studies")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=590)
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        studies, source = _studies(args.n, tmp)
        n = len(studies)
        rng = np.random.default_rng(args.seed)
        other = rng.permutation(n)
        other = np.where(other == np.arange(n), (other + 1) % n, other)
        keep = rng.random(n) < 0.6
        paths = []
        for name, own in (("A", np.zeros(n, bool)), ("B", keep)):
            path = tmp / f"{name}.jsonl"
            with path.open("w", encoding="utf-8") as fh:
                for i, s in enumerate(studies):
                    pred = s["reference"] if own[i] else studies[other[i]]["reference"]
                    fh.write(json.dumps({**s, "prediction": pred}) + "\n")
            paths.append(path)

        t0 = time.perf_counter()
        nlg.compute_nlg(["a b c ."], ["a b c ."])  # METEOR JVM start, timed on its own
        jvm = time.perf_counter() - t0

        # the scoring part alone (what compare does before resampling)
        timings = {}
        orig = cmp.paired_resampling

        def timed(*a, **kw):
            t = time.perf_counter()
            out = orig(*a, **kw)
            timings["resampling"] = time.perf_counter() - t
            return out

        cmp.paired_resampling = timed
        t1 = time.perf_counter()
        result = cmp.compare_files([str(p) for p in paths], tmp / "compare.json", resamples=args.resamples,
                                   seed=args.seed)
        total = time.perf_counter() - t1
        cmp.paired_resampling = orig
    seconds_with_jvm = total + jvm
    ok = seconds_with_jvm <= 60.0
    block = result["comparisons"][0]["metrics"]
    out = {
        "benchmark": "compare_speed", "source": source, "studies": n, "resamples": args.resamples,
        "metrics": len(block), "labeler": result["labeler"],
        "seconds_jvm_start": round(jvm, 2), "seconds_scoring": round(total - timings["resampling"], 2),
        "seconds_resampling": round(timings["resampling"], 2), "seconds_compare": round(total, 2),
        "seconds_total_with_jvm": round(seconds_with_jvm, 2), "limit_seconds": 60, "ok": ok,
        "example": {k: {kk: block[k][kk] for kk in ("diff", "ci95", "p")} for k in ("BLEU_4", "METEOR", "CIDEr",
                                                                                  "clinical_macro_f1")},
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    out_dir = Path(os.environ.get("OUT") or "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'step':<48}{'seconds':>9}")
    for label, key in (("METEOR JVM start", "seconds_jvm_start"), ("score A and B (as eval) + statistics",
                                                                     "seconds_scoring"),
                       (f"{args.resamples} bootstrap + permutation resamples", "seconds_resampling"),
                       ("total (incl. JVM)", "seconds_total_with_jvm")):
        print(f"{label:<48}{out[key]:>9.2f}")
    print(f"compare_speed: {n} studies ({source}), {len(block)} metrics, {args.resamples} resamples: "
          f"{seconds_with_jvm:.1f} s [{'ok' if ok else 'SLOW'}: limit 60 s] -> {out_dir / 'compare_speed.json'}")


if __name__ == "__main__":
    main()
