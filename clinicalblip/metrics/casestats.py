"""Per-case sufficient statistics of every metric, and the corpus-level metrics recomputed from weighted sums of them.

Resampling studies (a bootstrap, or swapping two systems' outputs study by study) must use each metric's corpus
definition: corpus BLEU and METEOR are not means of per-case scores. Every metric here is a function of a sum over
cases of a fixed-width row of numbers, so one matrix product ``weights @ rows`` gives the metric for thousands of
resamples at once:

- BLEU-1..4 (pycocoevalcap, ``closest`` reference length): clipped n-gram matches ``correct[1..4]``, candidate
  n-gram counts ``guess[1..4]``, candidate length, reference length, cooked by pycocoevalcap's own BleuScorer.
  The corpus formula (with its 1e-15 / 1e-9 smoothing and brevity penalty) is applied to the sums. Exact.
- METEOR 1.5: the jar's 23 sufficient statistics per segment (lengths, function words, matches per module
  exact/stem/synonym/paraphrase split content/function, chunks); the jar's own aggregation (``MeteorStats.addStats``:
  plain sums, except that a segment matching its reference perfectly in one chunk adds no chunks) and scoring
  (``MeteorScorer.computeMetrics`` with the ``-l en -norm`` default parameters) are reproduced in numpy. The
  alignments themselves are fixed per segment (they do not depend on other segments), so nothing is approximated:
  only the final arithmetic runs in numpy instead of Java (agreement to ~1e-15, tested).
- ROUGE-L: pycocoevalcap averages per-case scores, so the per-case score is its own sufficient statistic. Exact.
- CIDEr-D: per-case scores with the document frequencies (and log of the corpus size) of the *full* reference set
  held fixed. Under the paired permutation test this is exact (the references, hence the document frequencies, do
  not change when two systems' outputs are swapped); under the bootstrap it is an approximation: a resample with
  duplicated studies would, strictly, count duplicated references again in the document frequencies.
- Clinical P/R/F1: per case and label true positives, false positives, false negatives; per-label F1 and the
  micro F1 from the summed counts, macro F1 their mean over labels. Exact.
- The named CheXbert-F1 conventions (``clinicalblip.metrics.conventions``: ``<prefix>_{micro,macro}{14,5}_{upos,
  uneg}`` of the rule labeler and of CheXbert): per case the TP / FP / FN of the 14 observations under each
  uncertain policy (block ``conv/<prefix>_<upos|uneg>``, 42 columns); micro F1 from the summed counts of the label
  set, macro F1 the mean of its per-label F1 (0 for a label with no positive on either side, as ``corpus_f1``).
  The example-based scores are means of per-case values (``mean/<prefix>_example_*`` blocks). Exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from clinicalblip.metrics.conventions import LABEL_SETS, UNCERTAIN_SUFFIX, label_matrix, per_case_example
from clinicalblip.metrics.labeler import OBSERVATIONS
from clinicalblip.metrics.nlg import METRIC_KEYS

# METEOR 1.5 parameters for `-l en -norm` with the default task (MeteorConfiguration: alpha, beta, gamma, delta
# and the exact / stem / synonym / paraphrase module weights).
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.2, 0.6, 0.75
METEOR_WEIGHTS = (1.0, 0.6, 0.8, 0.6)

_BLEU_SMALL, _BLEU_TINY = 1e-9, 1e-15


# ---------------------------------------------------------------------------------------------- per-case rows
def meteor_rows(lines: Sequence[str]) -> np.ndarray:
    """(n, 21) array from the jar's SCORE lines: tl, rl, tf, rf, test content[4], ref content[4], test function[4],
    ref function[4], chunks as aggregated (0 for a one-chunk perfect match, as ``MeteorStats.addStats`` does)."""
    raw = np.array([[float(x) for x in line.split()] for line in lines], dtype=np.float64).reshape(len(lines), -1)
    if raw.shape[1] != 23:
        raise ValueError(f"METEOR statistics lines have {raw.shape[1]} numbers, expected 23")
    stages = raw[:, 4:20].reshape(-1, 4, 4)  # (n, module, [test content, ref content, test function, ref function])
    tc, rc, tfn, rfn = (stages[:, :, j] for j in range(4))
    chunks = raw[:, 20]
    perfect = ((tc + tfn).sum(1) == raw[:, 0]) & ((rc + rfn).sum(1) == raw[:, 1]) & (chunks == 1.0)
    return np.concatenate([raw[:, :4], tc, rc, tfn, rfn, np.where(perfect, 0.0, chunks)[:, None]], axis=1)


def meteor_from_sums(s: np.ndarray) -> np.ndarray:
    """Corpus METEOR from summed ``meteor_rows`` (..., 21) -> (...)."""
    tl, rl, tf, rf = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    tc, rc, tfn, rfn = s[..., 4:8], s[..., 8:12], s[..., 12:16], s[..., 16:20]
    chunks = s[..., 20]
    d = METEOR_DELTA
    w = np.asarray(METEOR_WEIGHTS)
    t_len = d * (tl - tf) + (1.0 - d) * tf
    r_len = d * (rl - rf) + (1.0 - d) * rf
    t_match = (tc * w * d).sum(-1) + (tfn * w * (1.0 - d)).sum(-1)
    r_match = (rc * w * d).sum(-1) + (rfn * w * (1.0 - d)).sum(-1)
    t_total = (tc + tfn).sum(-1)
    r_total = (rc + rfn).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = t_match / t_len
        recall = r_match / r_len
        fmean = 1.0 / (((1.0 - METEOR_ALPHA) / precision) + (METEOR_ALPHA / recall))
        perfect = (t_total == tl) & (r_total == rl) & (chunks == 1.0)
        frag = np.where(perfect, 0.0, chunks / ((t_total + r_total) / 2.0))
        score = fmean * (1.0 - METEOR_GAMMA * np.power(frag, METEOR_BETA))
    return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))


def bleu_from_sums(s: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed rows ``correct[4], guess[4], testlen, reflen`` (..., 10) -> (..., 4)."""
    correct, guess, testlen, reflen = s[..., 0:4], s[..., 4:8], s[..., 8], s[..., 9]
    ratio = (testlen + _BLEU_TINY) / (reflen + _BLEU_SMALL)
    with np.errstate(divide="ignore"):
        bp = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    prod = np.cumprod((correct + _BLEU_TINY) / (guess + _BLEU_SMALL), axis=-1)
    return prod ** (1.0 / np.arange(1, 5)) * bp[..., None]


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), 0 where undefined (as clinical.py)."""
    den = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)


# ---------------------------------------------------------------------------------------------- one system
@dataclass
class CaseStats:
    """One system's per-case rows (cases in ``ids`` order) and the layout of the metrics computed from them."""

    ids: list[str]
    blocks: dict[str, np.ndarray]  # name -> (n, k) rows; see module docstring
    observations: list[str]
    micro_sets: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)

    def reorder(self, ids: Sequence[str]) -> "CaseStats":
        """The same statistics with cases in ``ids`` order (a subset allowed)."""
        pos = {i: k for k, i in enumerate(self.ids)}
        idx = np.array([pos[i] for i in ids], dtype=np.int64)
        return CaseStats(list(ids), {k: v[idx] for k, v in self.blocks.items()}, self.observations, self.micro_sets)

    def matrix(self) -> tuple[np.ndarray, dict[str, slice]]:
        """All blocks side by side, (n, K), and where each block sits; a column of ones gives the total weight."""
        cols, where, at = [], {}, 0
        for name in ("ones", *sorted(self.blocks)):
            block = np.ones((self.n, 1)) if name == "ones" else self.blocks[name]
            cols.append(block)
            where[name] = slice(at, at + block.shape[1])
            at += block.shape[1]
        return np.concatenate(cols, axis=1), where


def metric_names(stats: CaseStats) -> list[str]:
    """The metrics ``metrics_from_sums`` returns for these statistics, in report order."""
    names = []
    if "bleu" in stats.blocks:
        names += list(METRIC_KEYS[:4])
    for key, block in (("METEOR", "meteor"), ("ROUGE_L", "rouge_l"), ("CIDEr", "cider")):
        if block in stats.blocks:
            names.append(key)
    if "tp" in stats.blocks:
        names += ["clinical_macro_f1"] + [f"clinical_{m}_f1" for m in stats.micro_sets]
        names += [f"f1/{o}" for o in stats.observations]
    for b in sorted(stats.blocks):
        if b.startswith("conv/"):
            prefix, suffix = b[len("conv/"):].rsplit("_", 1)
            names += [f"{prefix}_{avg}{n}_{suffix}" for n in LABEL_SETS for avg in ("micro", "macro")]
    names += [b[len("mean/"):] for b in sorted(stats.blocks) if b.startswith("mean/")]
    return names


def metrics_from_sums(sums: np.ndarray, where: Mapping[str, slice], stats: CaseStats) -> dict[str, np.ndarray]:
    """Every metric from weighted sums (..., K) of ``stats.matrix()`` rows."""
    out: dict[str, np.ndarray] = {}
    total = sums[..., where["ones"]][..., 0]
    if "bleu" in where:
        bleu = bleu_from_sums(sums[..., where["bleu"]])
        for k in range(4):
            out[f"BLEU_{k + 1}"] = bleu[..., k]
    if "meteor" in where:
        out["METEOR"] = meteor_from_sums(sums[..., where["meteor"]])
    for key, block in (("ROUGE_L", "rouge_l"), ("CIDEr", "cider")):
        if block in where:
            out[key] = sums[..., where[block]][..., 0] / total
    if "tp" in where:
        tp, fp, fn = (sums[..., where[b]] for b in ("tp", "fp", "fn"))
        f1 = f1_from_counts(tp, fp, fn)
        out["clinical_macro_f1"] = f1.mean(-1)
        for name, members in stats.micro_sets.items():
            cols = [stats.observations.index(m) for m in members]
            out[f"clinical_{name}_f1"] = f1_from_counts(tp[..., cols].sum(-1), fp[..., cols].sum(-1),
                                                        fn[..., cols].sum(-1))
        for j, o in enumerate(stats.observations):
            out[f"f1/{o}"] = f1[..., j]
    n_obs = len(OBSERVATIONS)
    for block in where:
        if block.startswith("conv/"):  # a labeler's TP / FP / FN of the 14 observations under one uncertain policy
            prefix, suffix = block[len("conv/"):].rsplit("_", 1)
            s = sums[..., where[block]]
            tp, fp, fn = s[..., :n_obs], s[..., n_obs:2 * n_obs], s[..., 2 * n_obs:]
            for n, members in LABEL_SETS.items():
                cols = [OBSERVATIONS.index(m) for m in members]
                out[f"{prefix}_micro{n}_{suffix}"] = f1_from_counts(tp[..., cols].sum(-1), fp[..., cols].sum(-1),
                                                                    fn[..., cols].sum(-1))
                out[f"{prefix}_macro{n}_{suffix}"] = f1_from_counts(tp[..., cols], fp[..., cols],
                                                                    fn[..., cols]).mean(-1)
    for block in where:
        if block.startswith("mean/"):  # metrics that are means of per-case scores (BERTScore, RadGraph, ...)
            out[block[len("mean/"):]] = sums[..., where[block]][..., 0] / total
    return out


def build_case_stats(ids: Sequence[str], nlg_cases: Mapping, ref_binary: np.ndarray, pred_binary: np.ndarray,
                     observations: Sequence[str], micro_sets: Mapping[str, Sequence[str]]) -> CaseStats:
    """CaseStats from ``nlg_with_case_stats``'s second dict and binary (n, L) label matrices."""
    blocks: dict[str, np.ndarray] = {}
    if "bleu_comps" in nlg_cases:
        blocks["bleu"] = np.asarray(nlg_cases["bleu_comps"], dtype=np.float64).reshape(len(ids), 10)
    if "meteor_stats" in nlg_cases:
        blocks["meteor"] = meteor_rows(nlg_cases["meteor_stats"])
    for key in ("rouge_l", "cider"):
        if key in nlg_cases:
            blocks[key] = np.asarray(nlg_cases[key], dtype=np.float64).reshape(-1, 1)
    y, p = np.asarray(ref_binary, dtype=bool), np.asarray(pred_binary, dtype=bool)
    blocks["tp"], blocks["fp"], blocks["fn"] = ((y & p).astype(float), (~y & p).astype(float),
                                                (y & ~p).astype(float))
    obs = list(observations)
    micro = {k: [m for m in v if m in obs] for k, v in micro_sets.items()}
    return CaseStats([str(i) for i in ids], blocks, obs, {k: v for k, v in micro.items() if v})


def convention_blocks(references: Sequence[Mapping], predictions: Sequence[Mapping], prefix: str) -> dict:
    """The per-case blocks of one labeler's named conventions (see the module docstring), to add to ``blocks``."""
    blocks: dict[str, np.ndarray] = {}
    for uncertain_as, suffix in UNCERTAIN_SUFFIX.items():
        y = label_matrix(references, uncertain_as).astype(bool)
        p = label_matrix(predictions, uncertain_as).astype(bool)
        blocks[f"conv/{prefix}_{suffix}"] = np.concatenate([y & p, ~y & p, y & ~p], axis=1).astype(np.float64)
    for name, v in zip(("precision", "recall", "f1"), per_case_example(references, predictions)):
        blocks[f"mean/{prefix}_example_{name}"] = np.asarray(v, dtype=np.float64).reshape(-1, 1)
    return blocks


# ---------------------------------------------------------------------------------------------- resampling
def bootstrap_weights(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """(resamples, n) multiplicities: each row is n studies drawn with replacement (vectorised bincount)."""
    idx = rng.integers(0, n, size=(resamples, n))
    idx += (np.arange(resamples) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def bootstrap_cis(stats: CaseStats, resamples: int, seed: int, chunk: int = 2000) -> dict[str, list[float]]:
    """Percentile 95 % intervals of every metric of one system (studies resampled with replacement)."""
    x, where = stats.matrix()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, resamples, chunk):
        w = bootstrap_weights(rng, min(chunk, resamples - start), stats.n)
        for k, v in metrics_from_sums(w @ x, where, stats).items():
            parts.setdefault(k, []).append(v)
    out = {}
    for k, v in parts.items():
        lo, hi = np.percentile(np.concatenate(v), [2.5, 97.5])
        out[k] = [float(lo), float(hi)]
    return out
