"""``clinicalblip metrics parity``: our neural metrics against the reference packages on the same reports.

The reference packages (``bert_score``, ``radgraph``, ``f1chexbert``) need an older transformers, so they run in
another Python (``--reference-python``): we write the reports and the weights paths to a JSON file, run a small
driver script there (``REFERENCE_DRIVER``; it prints one JSON object of per-report values), compute the same values
here from the same weights folder, and report the largest absolute difference per metric. The result is written to
``DIR/parity.json``; while it is missing or failed, CheXbert and RadGraph numbers carry "parity not checked".

Expected agreement (``TOLERANCES``): BERTScore and SembScore to 1e-4 (float32 kernels and batching differ),
CheXbert labels exactly (the largest difference of per-report label values is 0), RadGraph rewards to 1e-6
(identical annotations give identical rewards; the package adds no epsilon in its current rewards).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from clinicalblip.errors import UserError
from clinicalblip.metrics import weights as W

TOLERANCES = {"bertscore_f1": 1e-4, "sembscore": 1e-4, "chexbert_labels": 0.0, "radgraph_simple": 1e-6,
              "radgraph_partial": 1e-6, "radgraph_complete": 1e-6}

# Runs under the reference Python. Reads the job JSON (argv[1]), prints {"metric": [per-report values]}.
REFERENCE_DRIVER = r'''
import json, sys
job = json.load(open(sys.argv[1]))
refs, hyps, want, out = job["references"], job["predictions"], job["metrics"], {}
if "bertscore" in want:
    from bert_score import BERTScorer
    s = BERTScorer(model_type=job["distilroberta"], num_layers=5, idf=False, lang="en",
                   rescale_with_baseline=True, baseline_path=job["baseline"])
    P, R, F = s.score(hyps, refs)
    out["bertscore_f1"] = [float(x) for x in F]
if "radgraph" in want:
    import os, tarfile
    from radgraph import F1RadGraph
    cache = job["radgraph_cache"]
    target = os.path.join(cache, "radgraph")
    if not os.path.isdir(target) or not os.listdir(target):
        os.makedirs(target, exist_ok=True)
        with tarfile.open(job["radgraph_archive"], "r:gz") as t:
            t.extractall(target)
    f = F1RadGraph(reward_level="all", model_type="radgraph", model_cache_dir=cache)
    _, rewards, _, _ = f(hyps=hyps, refs=refs)
    out["radgraph_simple"], out["radgraph_partial"], out["radgraph_complete"] = [list(map(float, r)) for r in rewards]
if "chexbert" in want or "sembscore" in want:
    import torch
    from f1chexbert import F1CheXbert
    m = F1CheXbert(refs_filename=None, hyps_filename=None, device="cpu")
    if "chexbert" in want:
        lab = lambda t: [int(v) for v in m.get_label(t)]
        out["chexbert_labels"] = [lab(t) for t in refs] + [lab(t) for t in hyps]
    if "sembscore" in want:
        emb = lambda t: m.get_embeddings([t])[0]
        sims = []
        for r, h in zip(refs, hyps):
            a, b = torch.as_tensor(emb(r)).float().flatten(), torch.as_tensor(emb(h)).float().flatten()
            sims.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        out["sembscore"] = sims
print(json.dumps(out))
'''


def _ours(references, predictions, metrics_dir: Path, names: list[str]) -> dict[str, list]:
    from clinicalblip.metrics.neural_eval import score_neural

    want = [n for n in names if n in ("chexbert", "sembscore", "bertscore", "radgraph")]
    _, per_case = score_neural(references, predictions, metrics_dir, want)
    out = {k: per_case[k] for k in ("bertscore_f1", "sembscore", "radgraph_simple", "radgraph_partial",
                                    "radgraph_complete") if k in per_case}
    if "chexbert_labels" in per_case:
        from clinicalblip.metrics.neural import CHEXBERT_HEADS

        # f1chexbert's get_label: per head 1 positive, 0 negative or blank, -1 uncertain (its own mapping)
        def row(r):
            return [{1: 1, -1: -1}.get(r[o], 0) for o in CHEXBERT_HEADS]

        lab = per_case["chexbert_labels"]
        out["chexbert_labels"] = [row(r) for r in lab["reference"]] + [row(r) for r in lab["prediction"]]
    return out


def run_parity(reference_python: str, reports: str | Path, metrics_dir: str | Path, metrics: str = "chexbert",
               tolerance: float | None = None, timeout: int = 3600) -> dict:
    """Run the reference driver and ours; write DIR/parity.json; returns {"passed", "metrics": {...}}."""
    from clinicalblip.metrics.evaluate_predictions import read_predictions

    names = W.parse_metrics(metrics)
    root = W.require(metrics_dir, names)
    records, _ = read_predictions(reports)
    refs = [r.get("reference") or "" for r in records]
    preds = [r.get("prediction") or "" for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        job = {"references": refs, "predictions": preds, "metrics": names,
               "distilroberta": str(root / "distilroberta-base"),
               "baseline": str(Path(tmp) / "distilroberta-base.tsv"),
               "radgraph_archive": str(root / "radgraph" / "radgraph.tar.gz"),
               "radgraph_cache": str(Path(tmp) / "radgraph-cache"),
               "chexbert": str(root / "chexbert" / "chexbert.pth")}
        (Path(tmp) / "job.json").write_text(json.dumps(job), encoding="utf-8")
        # bert_score's published baseline table, written from the constants the project ships (byte-identical)
        from clinicalblip.metrics.neural import baseline_tsv

        (Path(tmp) / "distilroberta-base.tsv").write_text(baseline_tsv(), encoding="utf-8")
        (Path(tmp) / "driver.py").write_text(REFERENCE_DRIVER, encoding="utf-8")
        try:
            proc = subprocess.run([reference_python, str(Path(tmp) / "driver.py"), str(Path(tmp) / "job.json")],
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserError(f"could not run the reference Python {reference_python}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"the reference packages failed under {reference_python}: {tail[0]}")
        try:
            theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError) as exc:
            raise UserError(f"the reference driver printed no JSON result ({exc})") from exc
    ours = _ours(refs, preds, root, names)
    res: dict = {"reports": str(reports), "n": len(records), "metrics": {}}
    for key, mine in ours.items():
        if key not in theirs:
            continue
        a, b = np.asarray(mine, dtype=float), np.asarray(theirs[key], dtype=float)
        if a.shape != b.shape:
            raise UserError(f"parity: {key} has shape {a.shape} here but {b.shape} from the reference")
        tol = TOLERANCES.get(key, 1e-4) if tolerance is None else tolerance
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        res["metrics"][key] = {"max_abs_diff": diff, "tolerance": tol, "passed": diff <= tol}
    if not res["metrics"]:
        raise UserError("parity: the reference driver returned none of the requested metrics")
    res["passed"] = all(m["passed"] for m in res["metrics"].values())
    (root / W.PARITY_FILE).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return res


def format_parity(res: dict) -> str:
    lines = [f"parity on {res['n']} reports ({res['reports']})"]
    for k, m in res["metrics"].items():
        lines.append(f"  {k:<20} max |ours - reference| = {m['max_abs_diff']:.3g}  (tolerance {m['tolerance']:g})  "
                     + ("ok" if m["passed"] else "FAILED"))
    lines.append("parity passed" if res["passed"] else "parity FAILED")
    return "\n".join(lines)
