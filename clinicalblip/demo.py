"""Helpers for the embedded-default runbook (train.sh): the constant baseline and the summary table.

    python -m clinicalblip.demo constant --manifest M --out preds.jsonl
    python -m clinicalblip.demo summary RUN_DIR
    python -m clinicalblip.demo ablations EVAL_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from clinicalblip.data.manifest import read_manifest

VARIANTS = ("trained", "constant", "no_indication", "generic_indication", "prior_none", "prior_report", "prior_images")
COLUMNS = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "clinical_macro_f1")


def constant_predictions(manifest: str, out: str, split: str = "test") -> int:
    """The most frequent training report, predicted for every study of the split."""
    train = read_manifest(manifest, split="train", resolve_paths=False)
    if not train:
        raise SystemExit(f"{manifest}: no train records")
    most, _ = Counter((r.get("findings") or "").strip() for r in train).most_common(1)[0]
    rows = read_manifest(manifest, split=split, resolve_paths=False)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            row = {"id": r["id"], "prediction": most, "reference": r.get("findings") or ""}
            for key in ("dataset", "labels", "split"):
                if key in r:
                    row[key] = r[key]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def _metric_block(path: Path) -> dict:
    m = json.loads(path.read_text())
    keep = {k: m[k] for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr",
                              "clinical_macro_f1", "n") if k in m}
    per = (m.get("clinical") or {}).get("per_label")
    if per:
        keep["clinical_f1_per_finding"] = {k: (v.get("f1") if isinstance(v, dict) else v) for k, v in per.items()}
    return keep


def summary(run_dir: str, stages: list[str] | None = None) -> dict:
    """Write RUN_DIR/summary.json from the stage folders and metrics/*.json; print the table."""
    run = Path(run_dir)
    stage_names = stages or sorted(p.parent.name for p in run.glob("stage*/stage.json"))
    out = {"stages": [], "release_dir": str((run / "release").resolve()), "test": {}}
    for name in stage_names:
        info = json.loads((run / name / "stage.json").read_text())
        out["stages"].append({"name": info["name"], "dir": str((run / name).resolve()),
                              "val_loss": info.get("metrics", {}).get("val_loss")})
    for variant in VARIANTS:
        f = run / "metrics" / f"{variant}.json"
        if f.is_file():
            out["test"][variant] = _metric_block(f)
    priors = priors_summary(run)
    if priors:
        out["priors"] = priors
    (run / "summary.json").write_text(json.dumps(out, indent=2))
    print(format_table(out))
    if priors:
        print(format_priors(out))
    return out


# The prior ablations of train.sh: the trained prior-aware model with its test studies' priors shown as named.
PRIOR_VARIANTS = (("no_prior", "prior_none"), ("prior_report", "prior_report"), ("prior_images", "prior_images"),
                  ("both", "trained"))


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _subset_scores(rows: list[dict]) -> dict:
    """temporal_f1, change_f1 and clinical_macro_f1 (the synthetic findings, as eval computes it) of some rows."""
    from clinicalblip.data.synth import FINDINGS, label_report
    from clinicalblip.metrics.change import change_f1, change_labels, temporal_f1

    refs = [r.get("reference") or "" for r in rows]
    preds = [r.get("prediction") or "" for r in rows]
    f1s = []
    labelled = [(r["labels"], label_report(p)) for r, p in zip(rows, preds) if isinstance(r.get("labels"), dict)]
    for f in FINDINGS:
        tp = sum(1 for y, q in labelled if y.get(f) and q[f])
        fp = sum(1 for y, q in labelled if not y.get(f) and q[f])
        fn = sum(1 for y, q in labelled if y.get(f) and not q[f])
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return {"temporal_f1": temporal_f1(refs, preds),
            "change_f1": change_f1([change_labels(t) for t in refs], [change_labels(t) for t in preds])["change_f1"],
            "clinical_macro_f1": sum(f1s) / len(f1s) if labelled else None}


def priors_summary(run: Path) -> dict | None:
    """summary.json's "priors" block (issue 21's output contract) from preds/*.jsonl and metrics/priors_compare.json:
    on test studies with a prior, the trained model given the prior (with_prior) against the same model with the
    prior withheld (without_prior) and the paired p-values; on studies without one, the invented-comparison rate."""
    from clinicalblip.metrics.change import invented_comparison

    with_f, without_f = run / "preds" / "trained.jsonl", run / "preds" / "prior_none.jsonl"
    if not (with_f.is_file() and without_f.is_file()):
        return None
    rows_with, rows_without = _read_rows(with_f), _read_rows(without_f)
    if not any("has_prior" in r for r in rows_with):
        return None
    has = {r["id"] for r in rows_with if r.get("has_prior")}
    out = {"test_with_prior": {"n": len(has), "p_value": {}, "with_prior": _subset_scores(
        [r for r in rows_with if r["id"] in has]), "without_prior": _subset_scores(
        [r for r in rows_without if r["id"] in has])}}
    cmp_file = run / "metrics" / "priors_compare.json"
    ablations = {}
    if cmp_file.is_file():
        for c in json.loads(cmp_file.read_text()).get("comparisons", []):
            ablations[c["b"]] = {k: c["metrics"][k] for k in ("temporal_f1", "change_f1", "invented_comparison_rate")
                                 if k in c["metrics"]}
        both = ablations.get("both", {})
        out["test_with_prior"]["p_value"] = {k: both[k]["p"] for k in ("temporal_f1", "change_f1") if k in both}
    none_rows = [r for r in rows_with if not r.get("has_prior")]
    out["test_without_prior"] = {"n": len(none_rows), "invented_comparison_rate": (
        sum(invented_comparison(r.get("prediction")) for r in none_rows) / len(none_rows) if none_rows else None)}
    if ablations:
        out["ablations_vs_no_prior"] = ablations
    return out


def format_priors(s: dict) -> str:
    """The prior-aware ablation table (README): each prior input against the no-prior input, paired."""
    pr = s["priors"]
    w = pr["test_with_prior"]
    lines = ["", f"priors: {w['n']} test studies with a prior, {pr['test_without_prior']['n']} without",
             f"{'model input':<16}{'temporal_f1':>24}{'change_f1':>24}{'invented (no prior)':>22}"]
    abl = pr.get("ablations_vs_no_prior", {})
    base = next(iter(abl.values()), {}) if abl else {}

    def cell(t):
        return f"{t['b']:.3f} ({t['diff']:+.3f} p={t['p']:.4f})" if t else "-"

    if base:
        lines.append(f"{'no prior':<16}{base.get('temporal_f1', {}).get('a', float('nan')):>24.3f}"
                     f"{base.get('change_f1', {}).get('a', float('nan')):>24.3f}"
                     f"{base.get('invented_comparison_rate', {}).get('a', float('nan')):>22.3f}")
    for name, _ in PRIOR_VARIANTS[1:]:
        t = abl.get(name, {})
        inv = t.get("invented_comparison_rate")
        lines.append(f"{name.replace('_', ' '):<16}{cell(t.get('temporal_f1')):>24}{cell(t.get('change_f1')):>24}"
                     f"{(inv['b'] if inv else float('nan')):>22.3f}")
    lines.append(f"with prior vs withheld: change_f1 {w['with_prior']['change_f1']:.3f} vs "
                 f"{w['without_prior']['change_f1']:.3f} (target +0.15, p<0.01: p={w['p_value'].get('change_f1')}); "
                 f"clinical macro-F1 {w['with_prior']['clinical_macro_f1']:.3f} vs "
                 f"{w['without_prior']['clinical_macro_f1']:.3f}; invented comparisons without a prior "
                 f"{pr['test_without_prior']['invented_comparison_rate']} (target <= 0.02)")
    return "\n".join(lines)


def format_table(s: dict) -> str:
    lines = ["", "stage        val_loss"]
    for st in s["stages"]:
        vl = st["val_loss"]
        lines.append(f"{st['name']:<12} {'-' if vl is None else f'{vl:.4f}'}")
    lines.append("")
    lines.append(f"{'test split':<20}" + "".join(f"{c:>19}" for c in COLUMNS))
    for variant, m in s["test"].items():
        lines.append(f"{variant:<20}" + "".join(f"{m.get(c, float('nan')):>19.4f}" for c in COLUMNS))
    t = s["test"]
    if {"trained", "constant", "generic_indication"} <= set(t):
        f = {k: t[k].get("clinical_macro_f1", float("nan")) for k in t}
        lines += ["",
                  f"clinical macro-F1: trained - constant = {f['trained'] - f['constant']:+.3f} (target >= +0.30); "
                  f"generic indication = {f['generic_indication']:.3f} (target >= 0.40); "
                  f"real - generic = {f['trained'] - f['generic_indication']:+.3f} (target >= +0.05)"]
    lines.append(f"release: {s['release_dir']}")
    return "\n".join(lines)


ABLATIONS = (("real", "trained (real context)"), ("none", "no indication"), ("shuffled", "shuffled indications"),
             ("generic", "generic indication"), ("blank_image", "blank image"))


def _paired_cell(test: dict | None) -> str:
    """'-0.1130 [-0.15, -0.08] p=0.0004' from a compare.json metric block; 'n.s.' when not significant."""
    if not test:
        return ""
    p = test.get("p_holm", test["p"])
    lo, hi = test["ci95"]
    return f"{test['diff']:+.4f} [{lo:+.3f}, {hi:+.3f}] p={p:.4f}" + ("" if test.get("significant") else " n.s.")


def ablations(eval_dir: str) -> str:
    """eval.sh's table: one row per input ablation, from EVAL_DIR/metrics_<mode>.json; also written as
    ablations.md. With EVAL_DIR/compare.json (`clinicalblip compare` of the ablations against the real run), two
    more columns: the paired difference vs real with its 95 % CI and Holm-corrected p, for BLEU-4 and macro F1."""
    d = Path(eval_dir)
    tests: dict = {}
    if (d / "compare.json").is_file():
        for c in json.loads((d / "compare.json").read_text()).get("comparisons", []):
            tests[c["b"]] = c["metrics"]
    paired = ("BLEU_4", "clinical_macro_f1") if tests else ()
    header = "| ablation | " + " | ".join(COLUMNS) + "".join(f" | {c} vs real (95% CI, p)" for c in paired) + " |"
    rows = [header, "|" + " --- |" * (len(COLUMNS) + 1 + len(paired))]
    for mode, label in ABLATIONS:
        f = d / f"metrics_{mode}.json"
        if not f.is_file():
            continue
        m = _metric_block(f)
        cells = ["n/a" if m.get(c) is None else f"{m[c]:.4f}" for c in COLUMNS]  # None: skipped (no Java)
        cells += [_paired_cell(tests.get(mode, {}).get(c)) for c in paired]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    if paired:
        table += ("\n\nPaired tests against the real-context run (`clinicalblip compare`, compare.json): difference, "
                  "bootstrap 95% CI, approximate-randomisation p Holm-corrected over the ablations; n.s. = not "
                  "significant at 0.05.")
    (d / "ablations.md").write_text("# Input ablations\n\n" + table + "\n")
    print(table)
    return table


def prior_of(model_dir: str) -> str:
    """What a stage or release folder takes of the prior study (its data.prior): none | report | images | both."""
    import yaml

    from clinicalblip.release import is_release_dir, read_release

    d = Path(model_dir)
    if (d / "config.yaml").is_file() and (d / "stage.json").is_file():
        return str((yaml.safe_load((d / "config.yaml").read_text()) or {}).get("data", {}).get("prior") or "none")
    if is_release_dir(d):
        return str(read_release(d).get("prior") or "none")
    return "none"


def prior_ablations(eval_dir: str) -> str:
    """eval.sh's prior table: each prior input (preds_prior_<mode>.jsonl) against the no-prior input, from
    EVAL_DIR/compare_priors.json; also written as prior_ablations.md."""
    d = Path(eval_dir)
    res = json.loads((d / "compare_priors.json").read_text())
    keys = ("temporal_f1", "change_f1", "invented_comparison_rate", "clinical_macro_f1")
    rows = ["| prior input | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    first = res["comparisons"][0]["metrics"] if res["comparisons"] else {}
    rows.append("| none | " + " | ".join(f"{first[k]['a']:.4f}" if k in first and first[k].get("a") is not None
                                         else "" for k in keys) + " |")
    for c in res["comparisons"]:
        cells = []
        for k in keys:
            t = c["metrics"].get(k)
            cells.append("" if not t or t.get("b") is None else f"{t['b']:.4f} ({_paired_cell(t)})")
        rows.append(f"| {c['b']} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) + ("\n\nEach row against the same model with the prior withheld (`clinicalblip compare`, "
                               "compare_priors.json): difference, paired bootstrap 95% CI, permutation p (Holm over "
                               "the prior inputs). temporal_f1 and change_f1 over the studies with a prior, "
                               "invented_comparison_rate over those without.")
    (d / "prior_ablations.md").write_text("# Prior-study ablations\n\n" + table + "\n")
    print(table)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clinicalblip.demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("constant")
    c.add_argument("--manifest", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--split", default="test")
    s = sub.add_parser("summary")
    s.add_argument("run_dir")
    ab = sub.add_parser("ablations")
    ab.add_argument("eval_dir")
    pa = sub.add_parser("prior-ablations")
    pa.add_argument("eval_dir")
    po = sub.add_parser("prior-of")
    po.add_argument("model_dir")
    a = p.parse_args(argv)
    if a.cmd == "constant":
        n = constant_predictions(a.manifest, a.out, a.split)
        print(f"wrote {n} constant predictions to {a.out}")
    elif a.cmd == "ablations":
        ablations(a.eval_dir)
    elif a.cmd == "prior-ablations":
        prior_ablations(a.eval_dir)
    elif a.cmd == "prior-of":
        print(prior_of(a.model_dir))
    else:
        summary(a.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
