"""Evaluate a predictions file: NLG metrics + clinical efficacy -> metrics.json (+ report.md and a per-label F1 plot).

Predictions are JSON Lines ``{"id", "prediction", "reference", ...}``; a line holding a ``_provenance`` key
(model, template, decoding settings) is not a record: it is copied into metrics.json under ``provenance``, as is
``<predictions>.meta.json`` (what ``clinicalblip generate`` writes) when the file has no such line.

Clinical labels:
- ``chexpert`` (real reports): the rule labeler on prediction and on reference, the 14 CheXpert observations;
  ``clinical_macro_f1`` is the macro F1 over the 14.
- ``synthetic`` (records with ``"dataset": "synthetic"`` and true ``"labels"``): the synthetic dataset's own
  report parser (``clinicalblip.data.synth.label_report``) on the prediction against the record's true labels;
  ``clinical_macro_f1`` is the macro F1 over ``clinicalblip.data.synth.FINDINGS``.
- ``auto``: synthetic when every record is synthetic, else chexpert.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clinicalblip.jsonl import iter_json_objects
from clinicalblip.errors import UserError
from clinicalblip.metrics.casestats import bootstrap_cis, build_case_stats, convention_blocks
from clinicalblip.metrics.change import change_block, change_cases
from clinicalblip.metrics.clinical import binarize, clinical_scores
from clinicalblip.metrics.conventions import CONVENTION_PREFIXES, convention_scores
from clinicalblip.metrics.labeler import COMMON_FIVE, OBSERVATIONS, CheXbertLabeler, ChexpertRuleLabeler, Labeler
from clinicalblip.metrics.nlg import METRIC_KEYS, nlg_with_case_stats

log = logging.getLogger(__name__)

LABELER_CHOICES = ("auto", "chexpert", "synthetic", "chexbert")
# Neural metrics whose corpus value is the mean of per-case values (compare resamples them as such).
MEAN_CASE_KEYS = ("chexbert_example_f1", "sembscore", "bertscore_f1", "bertscore_radeval_f1", "radgraph_simple",
                  "radgraph_partial", "radgraph_complete", "radgraph_entity_relation", "radgraph_xl_simple",
                  "radgraph_xl_partial", "radgraph_xl_complete", "radgraph_xl_entity_relation", "radcliq_v1")


def read_predictions(path: str | Path) -> tuple[list[dict], dict | None]:
    """(records, provenance) from a predictions JSONL; clear UserErrors for a missing file or bad lines.

    The rule eval, view and compare share: an id that occurs twice is refused (which row counts is unknown);
    a record with an empty reference is skipped, with a warning naming the count and the ids (an empty
    reference would be labelled "No Finding" and score as a correct normal study).
    """
    records, provenance, _ = read_predictions_checked(path)
    return records, provenance


def read_predictions_checked(path: str | Path) -> tuple[list[dict], dict | None, list[str]]:
    """read_predictions plus the ids of the records skipped for an empty reference."""
    records, provenance = _read_predictions(path)
    seen: dict[str, int] = {}
    for rec in records:
        if rec.get("id") is None:
            continue
        rid = str(rec["id"])
        if rid in seen:
            raise UserError(f"{path}:{rec['_line']}: id {rid!r} appears twice (first on line {seen[rid]}); "
                            "one row per study (regenerate, or remove the extra row)")
        seen[rid] = rec["_line"]
    empty = [r for r in records if not (r.get("reference") or "").strip()]
    if empty:
        ids = [str(r.get("id", f"line {r['_line']}")) for r in empty]
        if len(empty) == len(records):
            raise UserError(f"{path}: every record has an empty reference ({len(records)}): nothing to score "
                            "against. Generate from a manifest whose records have the template's target section")
        log.warning("%s: skipping %d of %d records with an empty reference: %s%s", path, len(empty), len(records),
                    ", ".join(ids[:20]), f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
        records = [r for r in records if (r.get("reference") or "").strip()]
        return records, provenance, ids
    return records, provenance, []


def _read_predictions(path: str | Path) -> tuple[list[dict], dict | None]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"predictions file not found: {path}")
    if path.is_dir():
        raise UserError(f"predictions path is a folder, expected a .jsonl file: {path}")
    records: list[dict] = []
    provenance: dict | None = None
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in iter_json_objects(fh, path):
            if "_provenance" in rec:
                provenance = rec["_provenance"] if isinstance(rec["_provenance"], dict) else rec
                continue
            for key in ("prediction", "reference"):
                if key not in rec:
                    raise UserError(f"{path}:{lineno}: record {rec.get('id', '?')!r} has no '{key}' field")
                if rec[key] is not None and not isinstance(rec[key], str):
                    raise UserError(f"{path}:{lineno}: '{key}' must be a string")
            rec["_line"] = lineno
            records.append(rec)
    if not records:
        raise UserError(f"{path}: no prediction records")
    if provenance is None:
        # generate may also leave its provenance beside the predictions
        for side in (Path(str(path) + ".meta.json"), path.with_suffix(".provenance.json")):
            if side.is_file():
                try:
                    provenance = json.loads(side.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    log.warning("ignoring unreadable provenance file %s", side)
                break
    return records, provenance


def _is_synthetic(rec: dict) -> bool:
    return rec.get("dataset") == "synthetic" and isinstance(rec.get("labels"), dict)


def _resolve_labeler(records: list[dict], labeler: str) -> str:
    if labeler not in LABELER_CHOICES:
        raise UserError(f"unknown labeler {labeler!r}; choose one of {', '.join(LABELER_CHOICES)}")
    synthetic = [_is_synthetic(r) for r in records]
    if labeler == "auto":
        if all(synthetic):
            return "synthetic"
        if any(synthetic):
            raise UserError("the predictions mix synthetic records (with true 'labels') and real ones; "
                            "choose --labeler chexpert or --labeler synthetic explicitly")
        return "chexpert"
    if labeler == "synthetic" and not all(synthetic):
        bad = next(r for r, s in zip(records, synthetic) if not s)
        raise UserError(f"--labeler synthetic needs every record to carry \"dataset\": \"synthetic\" and a "
                        f"'labels' dict; line {bad['_line']} (id {bad.get('id')!r}) does not")
    return labeler


def case_labels(records: list[dict], which: str, labeler: Labeler | None = None) -> dict:
    """Per-case labels of reference and prediction under the resolved labeler ``which``.

    Returns ``observations``, ``reference`` / ``prediction`` (one dict per record: 1 / 0 / -1 / None per
    observation), ``micro_sets``, ``separate`` (observations also reported alone) and the labeler's ``name``.
    Synthetic: the record's true labels vs ``clinicalblip.data.synth.label_report`` on the prediction.
    """
    if which == "synthetic":
        try:
            from clinicalblip.data.synth import FINDINGS, label_report
        except ImportError as exc:
            raise UserError(f"synthetic labels need clinicalblip.data.synth (label_report, FINDINGS): {exc}") from exc
        refs, preds = [], []
        for rec in records:
            truth = rec["labels"]
            unknown = set(truth) - set(FINDINGS)
            if unknown:
                raise UserError(f"line {rec['_line']}: unknown synthetic finding(s) {sorted(unknown)}; "
                                f"known: {', '.join(FINDINGS)}")
            refs.append({f: int(bool(truth.get(f, 0))) for f in FINDINGS})
            got = label_report(rec.get("prediction") or "")
            preds.append({f: int(bool(got.get(f, 0))) for f in FINDINGS})
        return {"observations": list(FINDINGS), "reference": refs, "prediction": preds,
                "micro_sets": {"micro": tuple(FINDINGS)}, "separate": (),
                "name": "synthetic (clinicalblip.data.synth.label_report)"}
    if labeler is None:
        raise UserError(f"labeler {which!r} needs a labeler object")
    return {"observations": list(OBSERVATIONS),
            "reference": labeler.label([r.get("reference") or "" for r in records]),
            "prediction": labeler.label([r.get("prediction") or "" for r in records]),
            "micro_sets": {"micro_5": COMMON_FIVE, "micro": tuple(OBSERVATIONS)}, "separate": ("No Finding",),
            "name": labeler.name}


def binary_labels(labels: dict, uncertain_as: str = "positive") -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) boolean (n, L) matrices of ``case_labels``'s output, by the clinical convention."""
    obs = labels["observations"]
    y = np.array([[binarize(r.get(o), uncertain_as) for o in obs] for r in labels["reference"]], dtype=bool)
    p = np.array([[binarize(r.get(o), uncertain_as) for o in obs] for r in labels["prediction"]], dtype=bool)
    return y.reshape(-1, len(obs)), p.reshape(-1, len(obs))


def _clinical_block(labels: dict, which: str, uncertain_as: str, bootstrap: int, seed: int) -> dict:
    if which == "synthetic":
        block = clinical_scores(
            labels["reference"], labels["prediction"], labels["observations"], uncertain_as="positive",
            micro_sets=labels["micro_sets"], separate=(), bootstrap=bootstrap, seed=seed, labeler=labels["name"],
        )
        block["convention"] = ("binary labels: the synthetic report parser on the prediction vs the record's true "
                               "labels (no uncertain class)")
        block["uncertain_as"] = None
        return block
    block = clinical_scores(labels["reference"], labels["prediction"], uncertain_as=uncertain_as,
                            bootstrap=bootstrap, seed=seed, labeler=labels["name"])
    block["reference_labels_from"] = "the same labeler run on the reference reports"
    return block


def evaluate_records(
    records: list[dict],
    protocol: str = "r2gen",
    labeler: str = "auto",
    bootstrap: int = 1000,
    seed: int = 0,
    *,
    skip_java_metrics: bool = False,
    uncertain_as: str = "positive",
    chexbert_weights: str | Path | None = None,
    chexbert_tokenizer: str | Path | None = None,
    metrics_dir: str | Path | None = None,
    neural: str | Sequence[str] | None = None,
) -> tuple[dict, dict]:
    """(metrics, cases) for prediction records (as ``read_predictions`` returns them).

    ``metrics`` is metrics.json's content (without the file's name and provenance). ``cases`` holds what the case
    viewer and ``compare`` need per record: ``ids``, ``nlg`` (per-case sufficient statistics, see
    ``nlg_with_case_stats``), ``labels`` (``case_labels``), ``binary`` (reference, prediction) and ``stats`` (a
    ``casestats.CaseStats``). ``neural`` (e.g. ``"chexbert,rexrank"``) adds the metrics of ``neural_eval`` read from
    ``metrics_dir`` only; their per-case values go to ``cases["neural"]`` and to ``stats`` as mean blocks.
    """
    which = _resolve_labeler(records, labeler)
    neural_names = None
    if neural:
        from clinicalblip.metrics.weights import parse_metrics, require

        neural_names = parse_metrics(neural)
        require(metrics_dir, neural_names)  # a missing file fails before anything is scored
    if skip_java_metrics and protocol == "coco-ptb":
        raise UserError("protocol coco-ptb needs Java for the PTB tokenizer, so it cannot skip Java metrics; "
                        "use --protocol r2gen with --skip-java-metrics")
    refs = [r.get("reference") or "" for r in records]
    preds = [r.get("prediction") or "" for r in records]
    empty = sum(1 for p in preds if not p.strip())
    if empty:
        log.warning("%d of %d predictions are empty (scored as such)", empty, len(preds))

    # Build the labeler and score NLG first: missing weights, a missing Java or a bad protocol fail early.
    lab: Labeler | None = None
    if which == "chexbert":
        lab = CheXbertLabeler(chexbert_weights, chexbert_tokenizer)
    elif which == "chexpert":
        lab = ChexpertRuleLabeler()
    nlg, nlg_cases = nlg_with_case_stats(refs, preds, protocol=protocol,
                                         skip=("METEOR",) if skip_java_metrics else ())
    labels = case_labels(records, which, lab)
    clinical = _clinical_block(labels, which, uncertain_as, bootstrap, seed)

    metrics: dict[str, Any] = {k: nlg[k] for k in METRIC_KEYS}
    metrics["protocol"] = nlg["protocol"]
    metrics["n"] = nlg["n"]
    if nlg.get("skipped"):
        metrics["skipped"] = nlg["skipped"]
    metrics["clinical_macro_f1"] = clinical["macro"]["f1"]
    if which in CONVENTION_PREFIXES:
        # Every named convention (micro/macro x 14/5 x uncertain +/-, example-based) at the top level.
        conv = convention_scores(labels["reference"], labels["prediction"], CONVENTION_PREFIXES[which])
        metrics.update(conv)
        clinical["conventions"] = sorted(conv)
    metrics["clinical"] = clinical
    metrics["empty_predictions"] = empty
    change = change_block(records)  # rows that say whether the study has a prior (generate writes has_prior)
    if change is not None:
        metrics["change"] = change
        for k in ("temporal_f1", "change_f1", "invented_comparison_rate"):
            if k in change:
                metrics[k] = change[k]

    neural_cases: dict = {}
    if neural_names:
        from clinicalblip.metrics.neural_eval import score_neural

        summary, neural_cases = score_neural(refs, preds, metrics_dir, neural_names)
        metrics.update(summary)

    ids = [str(r.get("id", f"line{r['_line']}")) for r in records]
    y, p = binary_labels(labels, "positive" if which == "synthetic" else uncertain_as)
    stats = build_case_stats(ids, nlg_cases, y, p, labels["observations"], labels["micro_sets"])
    # the named conventions' per-case counts (compare resamples them): the eval labeler's, then CheXbert's
    if which in CONVENTION_PREFIXES:
        stats.blocks.update(convention_blocks(labels["reference"], labels["prediction"], CONVENTION_PREFIXES[which]))
    if "chexbert_labels" in neural_cases:
        cx = neural_cases["chexbert_labels"]
        stats.blocks.update(convention_blocks(cx["reference"], cx["prediction"], "chexbert"))
    for key in MEAN_CASE_KEYS:
        if key in neural_cases:  # corpus value = mean of per-case values: one (n, 1) block each
            stats.blocks[f"mean/{key}"] = np.asarray(neural_cases[key], dtype=np.float64).reshape(-1, 1)
    if bootstrap and bootstrap > 0:
        cis = bootstrap_cis(stats, int(bootstrap), int(seed))
        metrics["nlg_ci95"] = {k: [round(v, 6) for v in cis[k]] for k in METRIC_KEYS if k in cis}
        metrics["nlg_ci95_method"] = (
            f"percentile bootstrap over studies ({bootstrap} resamples, seed {seed}) of the corpus-level metrics "
            "recomputed from per-study sufficient statistics; CIDEr keeps the full reference set's document "
            "frequencies (clinicalblip.metrics.casestats)")
    cases = {"ids": ids, "nlg": nlg_cases, "labels": labels, "binary": (y, p), "stats": stats, "labeler": which,
             "neural": neural_cases, "change": change_cases(records)}
    return metrics, cases


def evaluate_predictions(
    pred_path: str | Path,
    out_path: str | Path,
    protocol: str = "r2gen",
    labeler: str = "auto",
    bootstrap: int = 1000,
    seed: int = 0,
    report_md: bool | str | Path = True,
    *,
    skip_java_metrics: bool = False,
    uncertain_as: str = "positive",
    chexbert_weights: str | Path | None = None,
    chexbert_tokenizer: str | Path | None = None,
    return_cases: bool = False,
    metrics_dir: str | Path | None = None,
    neural: str | Sequence[str] | None = None,
) -> dict | tuple[dict, list[dict], dict]:
    """Score ``pred_path`` and write ``out_path`` (metrics.json); returns the metrics dict.

    ``report_md``: True writes ``report.md`` (``<stem>.report.md`` unless the output is ``metrics.json``) and a
    per-label F1 PNG beside ``out_path``; a path writes the report there; False writes none. ``return_cases``:
    return ``(metrics, records, cases)`` (``evaluate_records``' per-case data, e.g. for the case viewer).
    """
    records, provenance, empty_refs = read_predictions_checked(pred_path)
    metrics, cases = evaluate_records(
        records, protocol, labeler, bootstrap, seed, skip_java_metrics=skip_java_metrics, uncertain_as=uncertain_as,
        chexbert_weights=chexbert_weights, chexbert_tokenizer=chexbert_tokenizer, metrics_dir=metrics_dir,
        neural=neural,
    )
    metrics["predictions"] = str(pred_path)
    metrics["empty_references"] = len(empty_refs)  # skipped, not scored (see read_predictions)
    if empty_refs:
        metrics["empty_reference_ids"] = empty_refs[:100]
    if provenance is not None:
        metrics["provenance"] = provenance

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if report_md:
        from clinicalblip.metrics.report import write_report

        md_path = Path(report_md) if not isinstance(report_md, bool) else _default_report_path(out_path)
        metrics["report"] = str(write_report(metrics, md_path))
    return (metrics, records, cases) if return_cases else metrics


def _default_report_path(out_path: Path) -> Path:
    if out_path.name == "metrics.json":
        return out_path.with_name("report.md")
    return out_path.with_name(out_path.stem + ".report.md")


def format_summary(metrics: dict) -> str:
    """A short plain-text table for the terminal."""
    def f(v):
        return "   n/a" if v is None else f"{v:6.4f}"

    lines = [f"n={metrics['n']}  protocol={metrics['protocol']}  labeler={metrics['clinical']['labeler']}"]
    if metrics.get("empty_references"):
        lines[0] += f"  ({metrics['empty_references']} records with an empty reference skipped)"
    lines.append("  ".join(f"{k:>7}" for k in METRIC_KEYS))
    lines.append("  ".join(f"{f(metrics[k]):>7}" for k in METRIC_KEYS))
    c = metrics["clinical"]
    ci = c["macro"].get("f1_ci95")
    extra = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    lines.append(f"clinical macro F1 ({len(c['observations'])} labels): {c['macro']['f1']:.4f}{extra}")
    from clinicalblip.metrics.report import labeler_note, present_macro

    present = present_macro(c)
    if present is not None and present["labels"] < len(c["per_label"]):
        lines.append(f"clinical macro F1 ({present['labels']} labels present in references or predictions): "
                     f"{present['f1']:.4f}")
    if "micro_5" in c:
        lines.append(f"clinical micro F1 (5 common): {c['micro_5']['f1']:.4f}")
    if "no_finding" in c:
        lines.append(f"No Finding F1: {c['no_finding']['f1']:.4f}")
    if "neural" in metrics:
        from clinicalblip.metrics.neural_eval import NEURAL_SUMMARY_KEYS

        shown = [f"{k}={metrics[k]:.4f}" for k in NEURAL_SUMMARY_KEYS if isinstance(metrics.get(k), float)]
        lines.append("neural metrics (" + metrics["neural"]["parity"] + "): " + "  ".join(shown))
    note = labeler_note(c)
    if note:
        lines.append(note.replace("`", ""))
    return "\n".join(lines)


def read_metrics_file(path: str | Path) -> dict:
    """A metrics.json written by `eval`; anything else (a predictions JSONL, a cut file) is refused naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"metrics file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        looks_jsonl = len(lines) > 1 and all(ln.lstrip().startswith("{") for ln in lines[:3])
        hint = (" (it looks like a predictions JSONL: run `clinicalblip eval` on it and pass the metrics.json it "
                "writes)" if looks_jsonl else "")
        raise UserError(f"{p}: not a metrics.json from `clinicalblip eval`: invalid JSON at line {exc.lineno}"
                        f"{hint}") from None
    if not isinstance(data, dict) or not ({"n", "protocol"} <= set(data) or "clinical" in data):
        raise UserError(f"{p}: not a metrics.json from `clinicalblip eval` (no 'n', 'protocol' or 'clinical' key)")
    return data
