"""Paired comparison of report-generation systems on the same studies: differences, bootstrap CIs, permutation p-values.

``compare_files([A, B, C, ...])`` scores each predictions file exactly as ``clinicalblip eval`` does (same code, the
file's own record order, so the point estimates are eval's to the last bit), then compares every later system with
the first one (``B - A``, ``C - A``, ...) on the studies all files share:

- the difference of every metric (BLEU-1..4, METEOR, ROUGE-L, CIDEr, clinical macro / micro F1, per-label F1, the
  named CheXbert-F1 conventions of the rule labeler and of CheXbert: ``rules_*`` / ``chexbert_*`` micro / macro
  F1 over 14 / 5 labels with uncertain as positive / negative and the example-based scores, and the neural metrics);
- a paired bootstrap 95 % interval of the difference: studies resampled with replacement, the same resample for
  both systems, each metric recomputed at corpus level from per-study sufficient statistics
  (``clinicalblip.metrics.casestats``: BLEU n-gram counts and lengths, METEOR's per-segment statistics, per-study
  ROUGE-L, per-study CIDEr-D with the full reference set's document frequencies held fixed, TP/FP/FN per label
  under each labeler and uncertain policy, so micro / macro F1 are recomputed at corpus level per resample);
- a two-sided paired approximate-randomisation p-value: in each of R trials every study's two outputs are swapped
  with probability 1/2 and the corpus-level difference recomputed; p = (1 + #{|d*| >= |d|}) / (1 + R);
- with more than two systems, Holm's step-down correction over the comparisons with the first system, per metric.

Bootstrap and permutation draws come from ``numpy.random.default_rng([seed, 0])`` and ``([seed, 1])``: the same
seed gives the same intervals and p-values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from clinicalblip.progress import progress as progress_bar

from clinicalblip.errors import UserError
from clinicalblip.metrics.casestats import CaseStats, bootstrap_weights, metric_names, metrics_from_sums
from clinicalblip.metrics.evaluate_predictions import evaluate_records, read_predictions
from clinicalblip.metrics.nlg import METRIC_KEYS

log = logging.getLogger(__name__)

ALPHA = 0.05
_CHUNK = 1000  # resamples per matrix product: bounded memory at MIMIC size (3,800 studies)


# ---------------------------------------------------------------------------------------------- loading
def _load(path: str | Path) -> list[dict]:
    records, _ = read_predictions(path)  # refuses duplicate ids, skips empty references (the eval rule)
    for rec in records:
        if rec.get("id") is None:
            raise UserError(f"{path}:{rec['_line']}: record has no 'id'; compare pairs studies by id")
    return records


def shared_studies(names: Sequence[str], files: Sequence[list[dict]], min_overlap: float = 0.9) -> list[str]:
    """Ids every file has, in the first file's order; a UserError with counts when the overlap is too small
    (fewer than ``min_overlap`` of the largest file's studies, or fewer than 2) or when a shared study's
    reference (or synthetic true labels) differs between files."""
    idsets = [set(str(r["id"]) for r in recs) for recs in files]
    common = set.intersection(*idsets)
    largest = max(len(s) for s in idsets)
    sizes = ", ".join(f"{n}: {len(s)}" for n, s in zip(names, idsets))
    if len(common) < 2 or len(common) < min_overlap * largest:
        raise UserError(f"the files share {len(common)} studies ({sizes}); compare needs at least "
                        f"{min_overlap:.0%} of the largest file ({int(np.ceil(min_overlap * largest))}) in common "
                        "(--min-overlap)")
    base = {str(r["id"]): r for r in files[0]}
    for name, recs in zip(names[1:], files[1:]):
        bad = []
        for r in recs:
            rid = str(r["id"])
            if rid not in common:
                continue
            a = base[rid]
            if (a.get("reference") or "").strip() != (r.get("reference") or "").strip() \
                    or a.get("labels") != r.get("labels"):
                bad.append(rid)
        if bad:
            raise UserError(f"{len(bad)} of {len(common)} shared studies have different references (or true "
                            f"labels) in {names[0]} and {name}, e.g. id {bad[0]!r}; a paired comparison needs the "
                            "same references")
    return [str(r["id"]) for r in files[0] if str(r["id"]) in common]


def official_values(metrics: dict) -> dict[str, float | None]:
    """The point estimates of ``metric_names`` from an eval metrics dict (what metrics.json says)."""
    c = metrics["clinical"]
    out: dict[str, float | None] = {k: metrics.get(k) for k in METRIC_KEYS}
    out["clinical_macro_f1"] = metrics["clinical_macro_f1"]
    for name in ("micro_5", "micro"):
        if name in c:
            out[f"clinical_{name}_f1"] = c[name]["f1"]
    for o, b in c["per_label"].items():
        out[f"f1/{o}"] = b["f1"]
    from clinicalblip.metrics.conventions import convention_keys
    from clinicalblip.metrics.evaluate_predictions import MEAN_CASE_KEYS

    for k in (*convention_keys("rules"), *convention_keys("chexbert"), *MEAN_CASE_KEYS):
        if k in metrics:
            out[k] = metrics[k]
    return out


# ---------------------------------------------------------------------------------------------- the tests
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adj[i] = running
    return [float(x) for x in adj]


def paired_resampling(base: CaseStats, others: Sequence[CaseStats], resamples: int = 10000, seed: int = 0,
                      progress: bool = False) -> list[dict[str, dict]]:
    """For each system in ``others`` vs ``base`` (same cases, same order): per metric the difference recomputed
    from the statistics (``diff``), the paired bootstrap 95 % interval (``ci95``) and the approximate-randomisation
    p-value (``p``)."""
    names = metric_names(base)
    xa, where = base.matrix()
    xs = [o.matrix()[0] for o in others]
    n = base.n
    total_a = xa.sum(0)
    point_a = metrics_from_sums(total_a, where, base)
    observed = []
    for x in xs:
        pb = metrics_from_sums(x.sum(0), where, base)
        observed.append({k: float(pb[k] - point_a[k]) for k in names})

    boot = [{k: [] for k in names} for _ in xs]
    hits = [{k: 0 for k in names} for _ in xs]
    rng_boot = np.random.default_rng([seed, 0])
    rng_perm = np.random.default_rng([seed, 1])
    steps = range(0, resamples, _CHUNK)
    for start in progress_bar(steps, desc="resampling", unit="chunk", disable=not progress):
        size = min(_CHUNK, resamples - start)
        w = bootstrap_weights(rng_boot, size, n)
        ma = metrics_from_sums(w @ xa, where, base)
        swap = rng_perm.integers(0, 2, size=(size, n)).astype(np.float64)
        for j, x in enumerate(xs):
            mb = metrics_from_sums(w @ x, where, base)
            shift = swap @ (x - xa)  # moving study i's B output to A and back: sums change by +-(b_i - a_i)
            pa = metrics_from_sums(total_a + shift, where, base)
            pb = metrics_from_sums(x.sum(0) - shift, where, base)
            for k in names:
                boot[j][k].append(mb[k] - ma[k])
                d = abs(observed[j][k])
                # relative slack: a swapped sum and the original can differ in the last bits
                hits[j][k] += int(np.count_nonzero(np.abs(pb[k] - pa[k]) >= d - 1e-9 * max(1.0, d)))
    out = []
    for j in range(len(xs)):
        res = {}
        for k in names:
            lo, hi = np.percentile(np.concatenate(boot[j][k]), [2.5, 97.5])
            res[k] = {"diff": observed[j][k], "ci95": [float(lo), float(hi)],
                      "p": (1 + hits[j][k]) / (1 + resamples)}
        out.append(res)
    return out


CHANGE_METRICS = ("temporal_f1", "change_f1", "invented_comparison_rate")


def _add_change_tests(comparisons: list[dict], cases: list[dict], shared: list[str], resamples: int, seed: int) -> None:
    """Paired tests of the change-aware metrics (clinicalblip.metrics.change), when the files say which studies
    have a prior: temporal and change F1 over those with one, the invented-comparison rate over those without."""
    from clinicalblip.metrics.change import paired_change_tests

    per = []
    for c in cases:
        ch = c.get("change")
        if ch is None:
            return
        pos = {i: k for k, i in enumerate(ch["ids"])}
        idx = [pos[i] for i in shared]
        per.append({k: (v[idx] if hasattr(v, "shape") else v) for k, v in ch.items()
                    if k in ("has_prior", "temporal", "invented", "counts")})
    for j, comp in enumerate(comparisons, start=1):
        for k, res in paired_change_tests(per[0], per[j], resamples, seed).items():
            comp["metrics"][k] = res


# ---------------------------------------------------------------------------------------------- the command
def compare_files(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    names: Sequence[str] | None = None,
    resamples: int = 10000,
    seed: int = 0,
    protocol: str = "r2gen",
    labeler: str = "auto",
    uncertain_as: str = "positive",
    skip_java_metrics: bool = False,
    min_overlap: float = 0.9,
    top: int = 50,
    progress: bool = False,
    metrics_dir: str | Path | None = None,
    neural: str | Sequence[str] | None = None,
) -> dict:
    """Compare predictions files (the first is the baseline) and write ``out`` (compare.json).

    Returns the result dict: ``systems`` (name, path, studies in the file, eval's point estimates on the shared
    studies), ``shared``, ``comparisons`` (one per later system: per metric ``a``, ``b``, ``diff`` = b - a,
    ``ci95``, ``p``, ``p_holm``, ``significant``), ``disagreements`` (studies where the systems' findings differ
    most) and ``method``.
    """
    if len(paths) < 2:
        raise UserError("compare needs at least two predictions files")
    if resamples < 1:
        raise UserError("--resamples must be at least 1")
    names = list(names) if names else [Path(p).stem for p in paths]
    if len(names) != len(paths):
        raise UserError(f"{len(names)} names for {len(paths)} files")
    if len(set(names)) != len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    files = [_load(p) for p in paths]
    shared = shared_studies(names, files, min_overlap)
    keep = set(shared)

    systems, stats, labels = [], [], []
    for name, path, recs in zip(names, paths, files):
        mine = [r for r in recs if str(r["id"]) in keep]  # the file's own order: eval's numbers exactly
        metrics, cases = evaluate_records(mine, protocol, labeler, bootstrap=0, seed=seed,
                                          skip_java_metrics=skip_java_metrics, uncertain_as=uncertain_as,
                                          metrics_dir=metrics_dir, neural=neural)
        systems.append({"name": name, "path": str(path), "studies_in_file": len(recs),
                        "metrics": official_values(metrics), "labeler": metrics["clinical"]["labeler"],
                        "absent_labels": [o for o, b in metrics["clinical"]["per_label"].items()
                                          if b["support"] == 0 and b["predicted"] == 0]})
        stats.append(cases["stats"].reorder(shared))
        labels.append(cases)
    if len({s["labeler"] for s in systems}) > 1:
        raise UserError("the files were labelled by different labelers: "
                        + ", ".join(f"{s['name']}: {s['labeler']}" for s in systems))

    tested = paired_resampling(stats[0], stats[1:], resamples, seed, progress=progress)
    metric_list = metric_names(stats[0])
    comparisons = []
    for j, res in enumerate(tested, start=1):
        block = {}
        for k in metric_list:
            a, b = systems[0]["metrics"].get(k), systems[j]["metrics"].get(k)
            block[k] = {"a": a, "b": b, "diff": (b - a) if a is not None and b is not None else res[k]["diff"],
                        "diff_from_statistics": res[k]["diff"], "ci95": res[k]["ci95"], "p": res[k]["p"]}
        comparisons.append({"a": names[0], "b": names[j], "metrics": block})
    _add_change_tests(comparisons, labels, shared, resamples, seed)
    for k in metric_list:
        adjusted = holm([c["metrics"][k]["p"] for c in comparisons])
        for c, p_adj in zip(comparisons, adjusted):
            c["metrics"][k]["p_holm"] = p_adj
            c["metrics"][k]["significant"] = bool(p_adj < ALPHA)

    for k in CHANGE_METRICS:
        have = [c for c in comparisons if k in c["metrics"]]
        for c, p_adj in zip(have, holm([c["metrics"][k]["p"] for c in have])):
            c["metrics"][k]["p_holm"] = p_adj
            c["metrics"][k]["significant"] = bool(p_adj < ALPHA)
    result = {
        "systems": systems,
        "shared": len(shared),
        "protocol": protocol,
        "labeler": systems[0]["labeler"],
        "resamples": resamples,
        "seed": seed,
        "alpha": ALPHA,
        "metrics": metric_list,
        "comparisons": comparisons,
        # per-label rows with no support in the references and no prediction by any system: 0 vs 0 says nothing
        "empty_rows": [f"f1/{o}" for o in systems[0]["absent_labels"]
                       if all(o in s["absent_labels"] for s in systems)],
        "disagreements": _disagreements(shared, names, files, labels, top),
        "method": {
            "difference": "b - a, each system's point estimate exactly as `clinicalblip eval` computes it",
            "ci95": "paired percentile bootstrap over studies (the same resample for both systems), corpus-level "
                    "metrics recomputed from per-study sufficient statistics",
            "p": "two-sided paired approximate randomisation: each study's two outputs swapped with probability "
                 "1/2; p = (1 + #{|d*| >= |d|}) / (1 + resamples)",
            "p_holm": "Holm step-down over the comparisons with the first system, per metric",
            "fixed": "CIDEr-D document frequencies and corpus size from the full shared reference set (exact for "
                     "the permutation test, an approximation under the bootstrap); METEOR alignments per study "
                     "(its corpus score is recomputed from summed per-study statistics exactly as the jar does)",
        },
    }
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def guess_viewer(pred_path: str | Path) -> str | None:
    """The viewer `eval --html` writes beside a predictions file by convention (PRED.html), if it exists."""
    guess = Path(pred_path).with_suffix(".html")
    return str(guess) if guess.is_file() else None


def _disagreements(shared: list[str], names: list[str], files: list[list[dict]], cases: list[dict],
                   top: int) -> list[dict]:
    """Studies where the systems' binary findings differ most (first vs each other, summed), with who was right."""
    obs = cases[0]["labels"]["observations"]
    rows = []
    per_sys = []
    for recs, c in zip(files, cases):
        pos = {i: k for k, i in enumerate(c["ids"])}
        idx = np.array([pos[i] for i in shared])
        y, p = c["binary"]
        text = {str(r["id"]): r.get("prediction") or "" for r in recs}
        per_sys.append((y[idx], p[idx], text))
    y0 = per_sys[0][0]
    preds = np.stack([s[1] for s in per_sys])  # (systems, n, L)
    differ = (preds != preds[0:1]).any(0)  # (n, L): some system disagrees with the first
    count = differ.sum(1)
    order = np.argsort(-count, kind="stable")
    for i in order[:top]:
        if count[i] == 0:
            break
        labs = []
        for j in np.flatnonzero(differ[i]):
            labs.append({"label": obs[j], "reference": int(y0[i, j]),
                         "systems": {n: int(preds[s, i, j]) for s, n in enumerate(names)}})
        rows.append({"id": shared[i], "n_labels": int(count[i]), "labels": labs,
                     "predictions": {n: per_sys[s][2][shared[i]] for s, n in enumerate(names)},
                     "reference": next(r.get("reference") or "" for r in files[0] if str(r["id"]) == shared[i])})
    return rows


def _fmt(v) -> str:
    return "    n/a" if v is None else f"{v:7.4f}"


def format_table(result: dict) -> str:
    """The terminal table: one block per comparison, one line per metric."""
    lines = [f"{result['shared']} shared studies; protocol {result['protocol']}; labeler {result['labeler']}; "
             f"{result['resamples']} resamples, seed {result['seed']}"]
    holm_note = len(result["comparisons"]) > 1
    hidden = set(result.get("empty_rows", []))
    for c in result["comparisons"]:
        lines.append("")
        lines.append(f"{c['b']}  vs  {c['a']}   (diff = {c['b']} - {c['a']})")
        head = f"{'metric':<34}{'A':>8}{'B':>8}{'diff':>9}  {'95% CI':<20}{'p':>8}"
        lines.append(head + (f"{'p_holm':>9}" if holm_note else ""))
        for k, m in c["metrics"].items():
            if k in hidden:
                continue
            ci = f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
            mark = " *" if m["significant"] else "  n.s."
            line = f"{k:<34}{_fmt(m['a']):>8}{_fmt(m['b']):>8}{m['diff']:+9.4f}  {ci:<20}{m['p']:8.4f}"
            lines.append(line + (f"{m['p_holm']:9.4f}" if holm_note else "") + mark)
    lines.append("")
    lines.append(f"* significant at {result['alpha']}" + (" after Holm correction" if holm_note else "")
                 + "; n.s. = not significant")
    if hidden:
        lines.append(f"not shown: {', '.join(k.removeprefix('f1/') for k in sorted(hidden))} (no support in the "
                     "references and never predicted: nothing to compare)")
    return "\n".join(lines)
