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

VARIANTS = ("trained", "constant", "no_indication", "generic_indication")
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
    (run / "summary.json").write_text(json.dumps(out, indent=2))
    print(format_table(out))
    return out


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
    a = p.parse_args(argv)
    if a.cmd == "constant":
        n = constant_predictions(a.manifest, a.out, a.split)
        print(f"wrote {n} constant predictions to {a.out}")
    elif a.cmd == "ablations":
        ablations(a.eval_dir)
    else:
        summary(a.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
