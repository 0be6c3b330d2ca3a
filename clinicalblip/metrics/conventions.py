"""The CheXbert-F1 conventions papers and leaderboards report, each under a key that names it.

One labeler's labels of the reference and of the generated reports (1 positive, 0 negative, -1 uncertain, None not
mentioned, over the 14 CheXpert observations) give these numbers, keyed ``<prefix>_<average><labels>_<uncertain>``:

- ``micro14`` / ``macro14``: corpus-level micro / macro F1 over the 14 observations; ``micro5`` / ``macro5`` over
  Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion. Computed as sklearn's ``f1_score`` with
  ``zero_division=0``: a label with no positive on either side scores 0 (which deflates macro-14 on IU X-Ray, where
  several observations never occur).
- ``upos``: uncertain counted as positive (RadEval, f1chexbert, CheXagent, BioNLP'24); ``uneg``: uncertain counted as
  negative (LLaVA-Rad's main numbers; its "+" keys are ``upos``). 0 and not mentioned are always negative.
- ``example_precision`` / ``example_recall`` / ``example_f1``: PromptMRG's example-based scores: per report over the
  14 observations, definite positives only (uncertain is not a positive), a report's undefined P/R/F1 is 0, then the
  mean over reports (sklearn's ``average="samples"`` with ``zero_division=0``).

The prefix is ``chexbert`` for the CheXbert labeler and ``rules`` for the built-in rule labeler (R2Gen used the
rule-based CheXpert labeler with uncertain -> 0, which is ``rules_*_uneg``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from clinicalblip.metrics.labeler import COMMON_FIVE, OBSERVATIONS

CONVENTION_PREFIXES = {"chexbert": "chexbert", "chexpert-rules": "rules", "chexpert": "rules"}
UNCERTAIN_SUFFIX = {"positive": "upos", "negative": "uneg"}
LABEL_SETS = {"14": tuple(OBSERVATIONS), "5": tuple(COMMON_FIVE)}


def label_matrix(rows: Sequence[Mapping[str, int | None]], uncertain_as: str,
                 observations: Sequence[str] = OBSERVATIONS) -> np.ndarray:
    """(n, L) 0/1 matrix: 1 where the label is 1, or -1 with ``uncertain_as='positive'``."""
    if uncertain_as not in UNCERTAIN_SUFFIX:
        raise ValueError(f"uncertain_as must be positive or negative, got {uncertain_as!r}")
    pos = (1, -1) if uncertain_as == "positive" else (1,)
    return np.array([[1 if r.get(o) in pos else 0 for o in observations] for r in rows],
                    dtype=np.int64).reshape(len(rows), len(observations))


def _prf(tp, fp, fn):
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-300), 0.0)
        f = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), 0.0)
    return p, r, f


def corpus_f1(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(micro F1, macro F1) of 0/1 matrices; a label with no positive on either side has F1 0."""
    y, p = y.astype(bool), p.astype(bool)
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    _, _, f = _prf(tp, fp, fn)
    _, _, micro = _prf(tp.sum(), fp.sum(), fn.sum())
    return float(micro), float(f.mean())


def example_based(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """Mean over reports of per-report (precision, recall, F1); undefined per-report values are 0."""
    y, p = y.astype(bool), p.astype(bool)
    tp, fp, fn = (y & p).sum(1), (~y & p).sum(1), (y & ~p).sum(1)
    pr, rc, f = _prf(tp, fp, fn)
    return float(pr.mean()), float(rc.mean()), float(f.mean())


def convention_keys(prefix: str) -> list[str]:
    """Every key ``convention_scores`` writes for ``prefix``, in a stable order."""
    keys = [f"{prefix}_{avg}{n}_{u}" for u in ("upos", "uneg") for n in ("14", "5") for avg in ("micro", "macro")]
    return keys + [f"{prefix}_example_{m}" for m in ("precision", "recall", "f1")]


def convention_scores(references: Sequence[Mapping[str, int | None]], predictions: Sequence[Mapping[str, int | None]],
                      prefix: str) -> dict[str, float]:
    """Every convention's number for one labeler's reference / prediction labels (see the module docstring)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference rows but {len(predictions)} prediction rows")
    out: dict[str, float] = {}
    for uncertain_as, suffix in UNCERTAIN_SUFFIX.items():
        y = label_matrix(references, uncertain_as)
        p = label_matrix(predictions, uncertain_as)
        for n, members in LABEL_SETS.items():
            cols = [OBSERVATIONS.index(m) for m in members]
            micro, macro = corpus_f1(y[:, cols], p[:, cols])
            out[f"{prefix}_micro{n}_{suffix}"] = micro
            out[f"{prefix}_macro{n}_{suffix}"] = macro
    ep, er, ef = example_based(label_matrix(references, "negative"), label_matrix(predictions, "negative"))
    out[f"{prefix}_example_precision"], out[f"{prefix}_example_recall"], out[f"{prefix}_example_f1"] = ep, er, ef
    return {k: out[k] for k in convention_keys(prefix)}


def per_case_example(references: Sequence[Mapping], predictions: Sequence[Mapping]) -> tuple[np.ndarray, ...]:
    """Per-report example-based (precision, recall, F1): the values ``example_*`` average."""
    y = label_matrix(references, "negative").astype(bool)
    p = label_matrix(predictions, "negative").astype(bool)
    return _prf((y & p).sum(1), (~y & p).sum(1), (y & ~p).sum(1))


def per_case_example_f1(references: Sequence[Mapping], predictions: Sequence[Mapping]) -> np.ndarray:
    """Per-report example-based F1 (the quantity ``example_f1`` averages), for paired tests and the viewer."""
    return per_case_example(references, predictions)[2]


def disagreements(reference: Mapping[str, int | None], prediction: Mapping[str, int | None]) -> list[dict]:
    """Observations whose label differs between reference and prediction (raw 1 / 0 / -1 / None values)."""
    return [{"observation": o, "reference": reference.get(o), "prediction": prediction.get(o)}
            for o in OBSERVATIONS if reference.get(o) != prediction.get(o)]


# Which paper or leaderboard reports which key (the README's table is written from this).
USED_BY = {
    "micro14_upos": "RadEval, f1chexbert, CheXagent, BioNLP'24 ('micro avg' 14)",
    "macro14_upos": "RadEval, f1chexbert, CheXagent, BioNLP'24 ('macro avg' 14)",
    "micro5_upos": "RadEval, f1chexbert, CheXagent, BioNLP'24 (5 labels)",
    "macro5_upos": "RadEval, f1chexbert, CheXagent, BioNLP'24 (5 labels)",
    "micro14_uneg": "LLaVA-Rad main table; R2Gen-era CE (rule labeler, -1 -> 0)",
    "macro14_uneg": "LLaVA-Rad main table",
    "micro5_uneg": "LLaVA-Rad main table",
    "macro5_uneg": "LLaVA-Rad main table",
    "example_f1": "PromptMRG and followers (example-based, positives only)",
}
