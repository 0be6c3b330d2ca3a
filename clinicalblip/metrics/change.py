"""Change-aware metrics: what a report says changed against the prior study.

- ``change_labels(text)``: per finding, new | worse | better | unchanged | resolved, read from report text. One
  rule parser for the synthetic dataset's change-phrase bank and for real report wording ("Interval
  improvement in left base consolidative opacity.", "Stable enlarged cardiomediastinal silhouette.", "Small to
  moderate left-sided pleural effusion, increased ... compared to prior"). Clause-level: a change cue and a
  finding in the same clause; a negated finding carries no change ("No new consolidation.").
- ``change_f1``: macro-F1 over findings of those labels (per finding: a hit is the same label in reference and
  prediction; a miss or a wrong label counts against recall and precision).
- ``temporal_f1``: the temporal entity F1 of Libra (Zhang et al., 2024, "Libra: Leveraging Temporal Images for
  Biomedical Radiology Analysis", arXiv:2411.19378) as RadEval reports it ("F1-Temporal"): per report, the F1
  between the sets of temporal keywords in reference and prediction; 1 when both sets are empty, 0 when only
  the reference's is; averaged over reports. Their keyword list comes from the temporal vocabulary of Bannur et
  al., 2023 ("Learning to Exploit Temporal Structure for Biomedical Vision-Language Processing", CVPR,
  arXiv:2301.04558): words of progression, regression, stability, appearance and resolution. ``TEMPORAL_KEYWORDS``
  is our own list written from that definition; unlike theirs it leaves out state words that are not change
  ("enlarged", "elevated": "The heart is enlarged" says nothing about the prior), and it matches whole words
  only (no NER model: none can be downloaded here).
- ``invented_comparison(text)``: the report refers to a prior study or to change. Over studies WITHOUT a prior,
  the share of such generated reports is the invented-comparison rate (CXR-ReDonE's failure mode).

Knows nothing of the model.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

CHANGE_LABELS = ("new", "worse", "better", "unchanged", "resolved")

# Findings the parser names: the synthetic dataset's five and the common real ones they map onto.
_FINDING_RE = {
    "cardiomegaly": r"cardiomegaly|cardiac (?:enlargement|silhouette|size)|heart(?: size)?|"
                    r"cardiomediastinal silhouette|enlarged (?:heart|cardiac)",
    "pleural_effusion": r"(?:pleural )?effusions?|costophrenic",
    "pneumothorax": r"pneumothora(?:x|ces)|pleural line",
    "consolidation": r"consolidat\w*|airspace (?:opacit\w*|disease)|pneumonia|infiltrat\w*|opacit(?:y|ies)",
    "nodule": r"nodul\w*|mass(?:es)?|granulomas?",
    "edema": r"edema|vascular congestion|interstitial markings",
    "atelectasis": r"atelecta\w*",
}
_FINDINGS = {f: re.compile(r"\b(?:" + p + r")\b") for f, p in _FINDING_RE.items()}

# Change cues, most specific first (the first cue found in a clause decides its label).
_CUES = (
    ("resolved", r"resolved|resolution|resolving|cleared|clearing|no longer (?:seen|visible|present|evident)|"
                 r"has (?:since )?disappeared|removed|removal"),
    ("new", r"new|newly|interval (?:development|appearance)|developed|developing|has appeared"),
    ("worse", r"increas\w*|worse\w*|worsen\w*|larger|enlarging|bigger|grow\w*|progress\w*|expanded|greater|"
              r"interval increase"),
    ("better", r"decreas\w*|improv\w*|smaller|less(?:er)?|reduc\w*|diminish\w*|regress\w*|shrunk|shrinking"),
    ("unchanged", r"unchanged|stable|stably|stability|no (?:significant |interval )?change|similar|"
                  r"again (?:seen|noted|visualized|demonstrated)|redemonstrat\w*|persist\w*|constant|"
                  r"unaltered|remains?"),
)
_CUE_RE = [(label, re.compile(r"\b(?:" + p + r")\b")) for label, p in _CUES]
_NEG = re.compile(r"\b(?:no|not|without|negative for|free of)\b")
_NO_CHANGE = re.compile(r"\bno (?:significant |interval )?change\b")
# Clauses: sentences, ';', and a comma that starts a new statement ("..., no pleural effusion", ", however").
_CLAUSE = re.compile(r"(?<=[.!?])\s+|\n+|;\s*|,\s+(?=(?:and |but )?(?:no|there|the|however|although)\b)")
# A cue inside advice or a hedge states no change: "recommend follow-up to document resolution".
_HEDGE = re.compile(r"\b(?:document|ensure|confirm|assess|evaluate|recommend\w*|could be|may be|versus|or)\s+(?:\w+\s+)?$")
_WINDOW = 8  # words between a finding and the change cue that describes it

TEMPORAL_KEYWORDS = frozenset((
    # progression
    "increase", "increased", "increasing", "worse", "worsen", "worsened", "worsening", "larger", "bigger",
    "enlarging", "growing", "progression", "progressive", "progressed", "expanded", "greater",
    # regression
    "decrease", "decreased", "decreasing", "improve", "improved", "improvement", "improving", "smaller",
    "reduced", "regression", "resolution", "resolved", "resolving", "cleared", "removal",
    # stability
    "stable", "stably", "stability", "unchanged", "unaltered", "constant", "persistent", "persistence",
    "persisting", "change",
    # appearance
    "new",
))
_WORD = re.compile(r"[a-z]+")

# A report refers to a prior study or to change: the words above plus explicit references to an earlier exam.
_COMPARISON = re.compile(
    r"\b(?:prior|previous|previously|compared|comparison|interval|again (?:seen|noted)|redemonstrat\w*|"
    r"no (?:significant |interval )?change|"
    r"since|no longer|" + "|".join(sorted(TEMPORAL_KEYWORDS - {"change", "greater", "constant"})) + r")\b")
_NO_COMPARISON = re.compile(r"\bno (?:prior|previous)(?: \w+){0,3} (?:available )?(?:for comparison|available)|"
                            r"\bno comparison\b|\bcomparison:? none\b|\babsence of (?:a )?comparison\b")


def change_labels(text: str | None) -> dict[str, str]:
    """{finding: new | worse | better | unchanged | resolved} for every finding whose change the text states.

    Per clause, each finding mention takes the nearest change cue within _WINDOW words (cues inside advice or
    hedges, and negated cues such as "no new", do not count); a negated finding ("No pleural effusion") has no
    change, except that "no change in X" is X unchanged. The first statement about a finding wins.
    """
    out: dict[str, str] = {}
    if not text:
        return out
    for clause in _CLAUSE.split(text.lower()):
        if not clause or not clause.strip():
            continue
        cues = []  # (start, end, label)
        for m in _NO_CHANGE.finditer(clause):
            cues.append((m.start(), m.end(), "unchanged"))
        for name, cue in _CUE_RE:
            for m in cue.finditer(clause):
                if _negated_cue(clause, m.start()) or _HEDGE.search(clause[: m.start()]):
                    continue
                if any(a <= m.start() < b for a, b, _ in cues):
                    continue  # inside "no change" or a longer cue
                cues.append((m.start(), m.end(), name))
        if not cues:
            continue
        for f, pat in _FINDINGS.items():
            if f in out:
                continue
            for m in pat.finditer(clause):
                before = clause[: m.start()]
                label = _nearest(clause, m.start(), m.end(), cues)
                if label is None:
                    continue
                # "No new consolidation", "no pleural effusion": a negated finding has no change, unless the cue
                # itself is the negation ("no longer seen", "no change in")
                if _NEG.search(before) and label not in ("resolved",) and not _NO_CHANGE.search(clause):
                    continue
                out[f] = label
                break
    return out


def _nearest(clause: str, start: int, end: int, cues: list[tuple[int, int, str]]) -> str | None:
    best, best_d = None, None
    for a, b, label in cues:
        if start <= a < end:
            continue  # the finding's own words ("cardiac enlargement" is not a cue here)
        span = clause[b:start] if b <= start else clause[end:a]
        d = len(span.split())
        if d <= _WINDOW and (best_d is None or d < best_d):
            best, best_d = label, d
    return best


def _negated_cue(clause: str, pos: int) -> bool:
    # "no new ...", "not increased": the cue itself is negated within three words before it
    before = clause[max(0, pos - 30): pos].split()[-3:]
    return any(w in ("no", "not", "without") for w in before)


def temporal_keywords(text: str | None) -> set[str]:
    """The temporal keywords (TEMPORAL_KEYWORDS) a text uses, as a set of words."""
    return {w for w in _WORD.findall((text or "").lower()) if w in TEMPORAL_KEYWORDS}


def temporal_f1_one(reference: str | None, prediction: str | None) -> float:
    """One report's temporal F1: 1 when both keyword sets are empty, 0 when one of them is."""
    r, p = temporal_keywords(reference), temporal_keywords(prediction)
    if not r and not p:
        return 1.0
    if not r or not p:
        return 0.0
    tp = len(r & p)
    return 2.0 * tp / (len(r) + len(p))


def temporal_f1(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean per-report temporal F1 (Libra / RadEval definition, see the module docstring)."""
    if not references:
        return float("nan")
    return sum(temporal_f1_one(r, p) for r, p in zip(references, predictions)) / len(references)


def invented_comparison(text: str | None) -> bool:
    """True when the text refers to a prior study or to change ("unchanged", "new", "compared with prior")."""
    t = (text or "").lower()
    t = _NO_COMPARISON.sub(" ", t)  # "No prior study for comparison." claims no comparison
    return bool(_COMPARISON.search(t))


def change_counts(ref_labels: Sequence[dict], pred_labels: Sequence[dict],
                  findings: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Per finding: tp (same change label), fp (a predicted label that is not the reference's), fn (a reference
    label not predicted as such)."""
    names = list(findings) if findings is not None else sorted(
        {f for d in list(ref_labels) + list(pred_labels) for f in d})
    out = {f: {"tp": 0, "fp": 0, "fn": 0} for f in names}
    for r, p in zip(ref_labels, pred_labels):
        for f in names:
            a, b = r.get(f), p.get(f)
            if a is not None and a == b:
                out[f]["tp"] += 1
                continue
            if b is not None:
                out[f]["fp"] += 1
            if a is not None:
                out[f]["fn"] += 1
    return out


def change_f1(ref_labels: Sequence[dict], pred_labels: Sequence[dict], findings: Iterable[str] | None = None) -> dict:
    """Macro-F1 over findings of the change labels: {"change_f1", "per_finding": {f: {p, r, f1, support}}}.

    Findings that neither side mentions are left out of the average; no finding at all scores NaN.
    """
    counts = change_counts(ref_labels, pred_labels, findings)
    per, f1s = {}, []
    for f, c in counts.items():
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
        per[f] = {"precision": p, "recall": r, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    return {"change_f1": sum(f1s) / len(f1s) if f1s else float("nan"), "per_finding": per}


def change_block(records: Sequence[dict], findings: Iterable[str] | None = None) -> dict | None:
    """eval's "change" block from prediction rows that say whether the study has a prior (`has_prior`, written by
    generate): temporal F1 and change F1 over the studies with a prior, the invented-comparison rate over those
    without; None when no row says."""
    if not any("has_prior" in r for r in records):
        return None
    with_p = [r for r in records if r.get("has_prior")]
    without = [r for r in records if "has_prior" in r and not r.get("has_prior")]
    out: dict = {"n_with_prior": len(with_p), "n_without_prior": len(without)}
    if with_p:
        refs = [r.get("reference") or "" for r in with_p]
        preds = [r.get("prediction") or "" for r in with_p]
        out["temporal_f1"] = temporal_f1(refs, preds)
        cf = change_f1([change_labels(t) for t in refs], [change_labels(t) for t in preds], findings)
        out["change_f1"] = cf["change_f1"]
        out["change_per_finding"] = cf["per_finding"]
    if without:
        out["invented_comparison_rate"] = sum(invented_comparison(r.get("prediction")) for r in without) / len(without)
        out["reference_comparison_rate"] = sum(invented_comparison(r.get("reference")) for r in without) / len(without)
    return out


# ------------------------------------------------------------------------------------------ per case, paired tests
FINDING_NAMES = tuple(_FINDING_RE)


def change_cases(records: Sequence[dict]) -> dict | None:
    """Per-study statistics for the viewer and paired tests (None when no row says `has_prior`): has_prior,
    temporal F1, invented comparison, and per finding (tp, fp, fn) of the change labels."""
    if not any("has_prior" in r for r in records):
        return None
    import numpy as np

    n, F = len(records), len(FINDING_NAMES)
    counts = np.zeros((n, F, 3))
    has = np.zeros(n, dtype=bool)
    temporal = np.zeros(n)
    invented = np.zeros(n)
    ref_l, pred_l = [], []
    for i, r in enumerate(records):
        has[i] = bool(r.get("has_prior"))
        a, b = change_labels(r.get("reference")), change_labels(r.get("prediction"))
        ref_l.append(a)
        pred_l.append(b)
        temporal[i] = temporal_f1_one(r.get("reference"), r.get("prediction"))
        invented[i] = float(invented_comparison(r.get("prediction")))
        for j, f in enumerate(FINDING_NAMES):
            x, y = a.get(f), b.get(f)
            if x is not None and x == y:
                counts[i, j, 0] = 1
                continue
            counts[i, j, 1] = y is not None
            counts[i, j, 2] = x is not None
    ids = [str(r.get("id")) for r in records]
    return {"ids": ids, "has_prior": has, "temporal": temporal, "invented": invented, "counts": counts,
            "reference": ref_l, "prediction": pred_l}


def _f1_from_sums(s) -> float:
    """Macro change-F1 from summed (F, 3) counts (findings without any label left out)."""
    import numpy as np

    tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean(f1, axis=-1) if np.any(den > 0) else np.full(f1.shape[:-1], np.nan)


def paired_change_tests(a: dict, b: dict, resamples: int = 10000, seed: int = 0) -> dict:
    """b vs a (change_cases of the same studies, same order): for temporal_f1 and change_f1 over the studies
    with a prior, and invented_comparison_rate over those without, {a, b, diff, p} with a two-sided paired
    approximate-randomisation p (each study's two outputs swapped with probability 1/2)."""
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    out = {}
    wp, np_ = a["has_prior"], ~a["has_prior"]
    tests = []
    if wp.any():
        tests.append(("temporal_f1", a["temporal"][wp], b["temporal"][wp], lambda x: x.mean(-1)))
        ca, cb = a["counts"][wp], b["counts"][wp]
        tests.append(("change_f1", ca, cb, None))
    if np_.any():
        tests.append(("invented_comparison_rate", a["invented"][np_], b["invented"][np_], lambda x: x.mean(-1)))
    for name, xa, xb, stat in tests:
        n = xa.shape[0]
        if name == "change_f1":
            va, vb = float(_f1_from_sums(xa.sum(0))), float(_f1_from_sums(xb.sum(0)))
        else:
            va, vb = float(stat(xa)), float(stat(xb))
        d = vb - va
        hits = 0
        for start in range(0, resamples, 1000):
            size = min(1000, resamples - start)
            swap = rng.integers(0, 2, size=(size, n)).astype(bool)
            if name == "change_f1":
                delta = (xb - xa)  # (n, F, 3)
                shift = np.einsum("sn,nfk->sfk", swap.astype(float), delta)
                pa = _f1_from_sums(xa.sum(0)[None] + shift)
                pb = _f1_from_sums(xb.sum(0)[None] - shift)
            else:
                shift = swap.astype(float) @ (xb - xa)
                pa = (xa.sum() + shift) / n
                pb = (xb.sum() - shift) / n
            dd = np.abs(np.nan_to_num(pb - pa))
            hits += int(np.count_nonzero(dd >= abs(d) - 1e-9 * max(1.0, abs(d))))
        # paired percentile bootstrap of the difference (the same resampled studies for both systems)
        boots = []
        for start in range(0, min(resamples, 2000), 500):
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(500, min(resamples, 2000) - start)).astype(float)
            if name == "change_f1":
                boots.append(_f1_from_sums(np.einsum("sn,nfk->sfk", w, xb))
                             - _f1_from_sums(np.einsum("sn,nfk->sfk", w, xa)))
            else:
                boots.append((w @ xb - w @ xa) / n)
        bd = np.concatenate(boots)
        bd = bd[np.isfinite(bd)]
        lo, hi = (np.percentile(bd, [2.5, 97.5]) if bd.size else (float("nan"), float("nan")))
        out[name] = {"a": va, "b": vb, "diff": d, "ci95": [float(lo), float(hi)],
                     "p": (1 + hits) / (1 + resamples), "n": int(n)}
    return out
