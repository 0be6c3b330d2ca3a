"""Clinical efficacy: per-label precision / recall / F1 between labels of generated and reference reports.

Labels come from a labeler (1 positive, 0 negative, -1 uncertain, None not mentioned). They are made binary with
one explicit convention, ``uncertain_as``: "positive" (-1 -> 1, the usual CE convention in report-generation papers)
or "negative" (-1 -> 0); 0 and None are always negative. Averages: macro over all observations, micro over the five
common CheXpert observations (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) and over all,
and No Finding on its own line. 95 % intervals come from a seeded percentile bootstrap over reports (the same
resamples for every number, so the intervals are deterministic for a given seed).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from clinicalblip.errors import UserError
from clinicalblip.metrics.labeler import COMMON_FIVE, OBSERVATIONS

UNCERTAIN_CONVENTIONS = ("positive", "negative")


def binarize(value, uncertain_as: str = "positive") -> int:
    """1 for positive (and uncertain when ``uncertain_as='positive'``), else 0."""
    if value is None:
        return 0
    v = int(value)
    if v == 1:
        return 1
    if v == -1:
        return 1 if uncertain_as == "positive" else 0
    return 0


def _f1_from_counts(tp, fp, fn):
    """Vectorised P, R, F1 with 0 where undefined (no predicted / no true positives)."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return p, r, f


def _ci(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo), 6), round(float(hi), 6)]


def _bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    # Multiplicity of each report in each resample: (resamples, n). A resample is n draws with replacement.
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def clinical_scores(
    references: Sequence[Mapping[str, int | None]],
    predictions: Sequence[Mapping[str, int | None]],
    observations: Sequence[str] = OBSERVATIONS,
    *,
    uncertain_as: str = "positive",
    micro_sets: Mapping[str, Sequence[str]] | None = None,
    separate: Sequence[str] = ("No Finding",),
    bootstrap: int = 1000,
    seed: int = 0,
    labeler: str = "chexpert-rules",
) -> dict:
    """Per-label and averaged P/R/F1 (with bootstrap 95 % CIs) of ``predictions`` against ``references``.

    ``references`` and ``predictions`` are label dicts, one per report, in the same order. ``micro_sets`` names
    the micro averages to report (default: ``micro_5`` over COMMON_FIVE when those are observed, and ``micro``
    over all); ``separate`` names observations also reported on their own (No Finding).
    """
    if uncertain_as not in UNCERTAIN_CONVENTIONS:
        raise UserError(f"uncertain_as must be one of {UNCERTAIN_CONVENTIONS}, got {uncertain_as!r}")
    if len(references) != len(predictions):
        raise UserError(f"{len(references)} reference label rows but {len(predictions)} prediction rows")
    n = len(references)
    if n == 0:
        raise UserError("no reports to score")
    obs = list(observations)
    if micro_sets is None:
        micro_sets = {}
        if all(o in obs for o in COMMON_FIVE):
            micro_sets["micro_5"] = COMMON_FIVE
        micro_sets["micro"] = tuple(obs)
    y = np.array([[binarize(r.get(o), uncertain_as) for o in obs] for r in references], dtype=bool)
    p = np.array([[binarize(r.get(o), uncertain_as) for o in obs] for r in predictions], dtype=bool)
    tp_v, fp_v, fn_v = (y & p).astype(float), (~y & p).astype(float), (y & ~p).astype(float)

    def summarise(tp, fp, fn):
        pr, rc, f1 = _f1_from_counts(tp, fp, fn)
        return pr, rc, f1

    # point estimates
    tp, fp, fn = tp_v.sum(0), fp_v.sum(0), fn_v.sum(0)
    pr, rc, f1 = summarise(tp, fp, fn)
    # bootstrap: the same resampled report sets for every number
    boot = None
    if bootstrap and bootstrap > 0:
        w = _bootstrap_weights(n, int(bootstrap), int(seed))
        btp, bfp, bfn = w @ tp_v, w @ fp_v, w @ fn_v  # (B, L)
        _, _, bf1 = summarise(btp, bfp, bfn)
        boot = (btp, bfp, bfn, bf1)

    per_label = {}
    for j, o in enumerate(obs):
        entry = {
            "precision": float(pr[j]), "recall": float(rc[j]), "f1": float(f1[j]),
            "support": int(y[:, j].sum()), "predicted": int(p[:, j].sum()),
            "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(n - tp[j] - fp[j] - fn[j]),
        }
        if boot is not None:
            entry["f1_ci95"] = _ci(boot[3][:, j])
        per_label[o] = entry

    out: dict = {
        "labeler": labeler,
        "uncertain_as": uncertain_as,
        "convention": (f"uncertain (-1) counted as {uncertain_as}; 0 and not mentioned are negative; "
                       "P/R/F1 are 0 where undefined"),
        "n": n,
        "observations": obs,
        "per_label": per_label,
    }
    macro = {"precision": float(pr.mean()), "recall": float(rc.mean()), "f1": float(f1.mean()), "over": obs}
    if boot is not None:
        macro["f1_ci95"] = _ci(boot[3].mean(1))
    out["macro"] = macro
    for name, members in micro_sets.items():
        cols = [obs.index(m) for m in members if m in obs]
        if not cols:
            continue
        mp, mr, mf = summarise(tp[cols].sum(), fp[cols].sum(), fn[cols].sum())
        block = {"precision": float(mp), "recall": float(mr), "f1": float(mf), "over": [obs[c] for c in cols]}
        if boot is not None:
            _, _, bmf = summarise(boot[0][:, cols].sum(1), boot[1][:, cols].sum(1), boot[2][:, cols].sum(1))
            block["f1_ci95"] = _ci(bmf)
        out[name] = block
    for name in separate:
        if name in per_label:
            key = name.lower().replace(" ", "_")
            out[key] = {k: per_label[name][k] for k in ("precision", "recall", "f1", "support", "predicted")}
            if "f1_ci95" in per_label[name]:
                out[key]["f1_ci95"] = per_label[name]["f1_ci95"]
    if boot is not None:
        out["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "interval": "percentile 2.5-97.5",
                            "unit": "report"}
    return out
