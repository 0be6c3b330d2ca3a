"""``eval --metrics-dir DIR --metrics ...``: the neural metrics of one predictions set, corpus-level and per case.

Keys written to metrics.json (each names its convention; see the README's metric table):

- ``chexbert``: every CheXbert-F1 convention (``chexbert_micro14_upos`` ... ``chexbert_example_f1``, see
  ``conventions``);
- ``sembscore``: ``sembscore`` (mean cosine of CheXbert [CLS] embeddings);
- ``bertscore``: ``bertscore_f1`` / ``_precision`` / ``_recall`` (distilroberta-base, layer 5, rescaled, IDF off:
  ReXrank / RadCliQ); ``bertscore-radeval``: ``bertscore_radeval_f1`` ... (distilbert-base-uncased, layer 5,
  rescaled: RadEval);
- ``radgraph``: ``radgraph_simple`` (RG_E), ``radgraph_partial`` (RG_ER), ``radgraph_complete`` (RG_ER-bar) and
  ``radgraph_entity_relation`` ((entity F1 + relation F1) / 2, ReXrank / RadCliQ), with the original model;
  ``radgraph-xl``: ``radgraph_xl_simple`` ... with RadGraph-XL (RadEval);
- ``radcliq``: ``radcliq_v1`` (mean per-report RadCliQ-v1, lower is better) and ``radcliq_v1_inverse``
  (1 / radcliq_v1, what ReXrank shows).

CheXbert and RadGraph numbers carry ``parity_checked: false`` (and a visible note) until ``metrics parity`` has
passed on the weights folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clinicalblip.errors import UserError
from clinicalblip.metrics import weights as W


def score_neural(references: Sequence[str], predictions: Sequence[str], metrics_dir: str | Path,
                 names: Sequence[str], device: str = "cpu") -> tuple[dict, dict]:
    """(summary, per_case) for the metric ``names`` (already expanded by ``weights.parse_metrics``).

    ``summary`` holds the metrics.json keys plus a ``neural`` block (folder, metrics, parity, definitions);
    ``per_case`` maps each per-report quantity to a list (for compare, the viewer and paired tests) and holds the
    CheXbert labels under ``chexbert_labels`` when CheXbert ran.
    """
    from clinicalblip.metrics import neural as N

    root = W.require(metrics_dir, names)
    refs, preds = [r or "" for r in references], [p or "" for p in predictions]
    out: dict = {}
    per_case: dict = {}
    chexbert = None
    need_semb = "sembscore" in names or "radcliq" in names
    if "chexbert" in names or need_semb:
        chexbert = N.CheXbert(root / "chexbert/chexbert.pth", root / "bert-base-uncased", device=device)
    if "chexbert" in names:
        from clinicalblip.metrics.conventions import convention_scores, per_case_example_f1

        ref_l, pred_l = chexbert.label(refs), chexbert.label(preds)
        out.update(convention_scores(ref_l, pred_l, "chexbert"))
        per_case["chexbert_example_f1"] = per_case_example_f1(ref_l, pred_l).tolist()
        per_case["chexbert_labels"] = {"reference": ref_l, "prediction": pred_l}
    if need_semb:
        semb = N.sembscore(chexbert.embed(refs), chexbert.embed(preds))
        per_case["sembscore"] = semb.tolist()
        if "sembscore" in names or "radcliq" in names:
            out["sembscore"] = float(semb.mean())
    bert_runs = []
    if "bertscore" in names or "radcliq" in names:
        bert_runs.append(("bertscore", root / "distilroberta-base", N.DISTILROBERTA_L5_BASELINE))
    if "bertscore-radeval" in names:
        bert_runs.append(("bertscore_radeval", root / "distilbert-base-uncased", N.DISTILBERT_L5_BASELINE))
    for key, d, baseline in bert_runs:
        s = N.BERTScorer(d, layer=5, baseline=baseline, device=device).score(preds, refs)
        for part in ("precision", "recall", "f1"):
            out[f"{key}_{part}"] = float(s[part].mean())
        per_case[f"{key}_f1"] = s["f1"].tolist()
    for name, key, model_type in (("radgraph", "radgraph", "radgraph"), ("radgraph-xl", "radgraph_xl", "radgraph-xl")):
        if name in names or (name == "radgraph" and "radcliq" in names):
            from clinicalblip.metrics.radgraph import RadGraph, encoder_dir_for, radgraph_scores

            archive = root / "radgraph" / f"{model_type}.tar.gz"
            rg = RadGraph(archive, encoder_dir_for(archive), model_type=model_type, device=device)
            hyp_ann, ref_ann = rg.annotate(preds), rg.annotate(refs)
            # The package scores a pair with an empty side 0 without running the model on it.
            empty = [not p.strip() or not r.strip() for p, r in zip(preds, refs)]
            sc = radgraph_scores(hyp_ann, ref_ann)
            for level, vals in sc.items():
                vals = [0.0 if e else v for v, e in zip(vals, empty)]
                out[f"{key}_{level}"] = float(np.mean(vals))
                per_case[f"{key}_{level}"] = vals
            per_case[f"{key}_annotations"] = {"reference": ref_ann, "prediction": hyp_ann}
    if "radcliq" in names:
        bleu2 = np.array([N.sentence_bleu2(r, p) for r, p in zip(refs, preds)])
        rq = N.radcliq_v1(np.array(per_case["radgraph_entity_relation"]), np.array(per_case["bertscore_f1"]),
                          np.array(per_case["sembscore"]), bleu2)
        per_case["radcliq_v1"] = rq.tolist()
        out["radcliq_v1"] = float(rq.mean())
        out["radcliq_v1_inverse"] = float(1.0 / rq.mean()) if rq.mean() != 0 else None
    parity = W.parity_status(root)
    out["neural"] = {
        "metrics_dir": str(root), "metrics": list(names), "parity_checked": parity["checked"],
        "parity": parity["note"],
        "per_case_keys": sorted(k for k, v in per_case.items() if isinstance(v, list)),
    }
    if not parity["checked"] and any(n in names for n in ("chexbert", "radgraph", "radgraph-xl", "radcliq")):
        out["parity_not_checked"] = [n for n in names if n in ("chexbert", "radgraph", "radgraph-xl", "radcliq")]
    return out, per_case


NEURAL_SUMMARY_KEYS = (
    "chexbert_micro14_upos", "chexbert_macro14_upos", "chexbert_micro5_upos", "chexbert_macro5_upos",
    "chexbert_micro14_uneg", "chexbert_macro14_uneg", "chexbert_micro5_uneg", "chexbert_macro5_uneg",
    "chexbert_example_precision", "chexbert_example_recall", "chexbert_example_f1", "sembscore",
    "bertscore_f1", "bertscore_radeval_f1", "radgraph_simple", "radgraph_partial", "radgraph_complete",
    "radgraph_entity_relation", "radgraph_xl_simple", "radgraph_xl_partial", "radgraph_xl_complete",
    "radgraph_xl_entity_relation", "radcliq_v1", "radcliq_v1_inverse",
)


def check_names(spec: str | None) -> list[str]:
    if not spec:
        raise UserError("--metrics needs a comma-separated list, e.g. chexbert,radgraph,bertscore,rexrank")
    return W.parse_metrics(spec)


# ------------------------------------------------------------------------------------------------ one named metric
def metric_for_key(key: str) -> str | None:
    """The ``--metrics`` name that produces ``key`` (``rules_*`` keys need no weights: None)."""
    from clinicalblip.metrics.conventions import convention_keys

    if key in convention_keys("rules"):
        return None
    if key in convention_keys("chexbert"):
        return "chexbert"
    for prefix, name in (("bertscore_radeval_", "bertscore-radeval"), ("bertscore_", "bertscore"),
                         ("radgraph_xl_", "radgraph-xl"), ("radgraph_", "radgraph"), ("radcliq_v1", "radcliq"),
                         ("sembscore", "sembscore")):
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if name.startswith("radgraph") and suffix not in ("simple", "partial", "complete", "entity_relation"):
                break
            if name.startswith("bertscore") and suffix not in ("precision", "recall", "f1"):
                break
            return name
    raise UserError(f"unknown clinical metric {key!r}: use a rules_* or chexbert_* convention key (e.g. "
                    "rules_micro5_upos), sembscore, bertscore_f1, bertscore_radeval_f1, radgraph_partial, "
                    "radgraph_xl_partial, radgraph_entity_relation or radcliq_v1")


def named_metric(key: str, references: Sequence[str], predictions: Sequence[str],
                 metrics_dir: str | Path | None = None) -> float:
    """One metrics.json key computed on these reports (e.g. for checkpoint selection during training)."""
    name = metric_for_key(key)
    if name is None:
        from clinicalblip.metrics.conventions import convention_scores
        from clinicalblip.metrics.labeler import ChexpertRuleLabeler

        lab = ChexpertRuleLabeler()
        return convention_scores(lab.label(list(references)), lab.label(list(predictions)), "rules")[key]
    summary, _ = score_neural(references, predictions, metrics_dir, [name])
    if summary.get(key) is None:
        raise UserError(f"metric {key} is undefined on these reports")
    return float(summary[key])
