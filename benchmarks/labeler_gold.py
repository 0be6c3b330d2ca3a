"""The rule labeler against expert labels: NegBio's OpenI gold standard on IU X-Ray reports (findings + impression).

    python benchmarks/labeler_gold.py --data ../shared/data/iu_xray_dev [--out DIR] [--errors Cardiomegaly]

Prints per-label precision / recall / F1 with uncertain counted as positive and as negative, and writes
labeler_gold.json under $OUT (or --out). Gold columns map to CheXpert observations: Effusion -> Pleural Effusion,
Mass or Nodule -> Lung Lesion, normal -> No Finding. The data is read in place and never copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinicalblip.metrics.labeler import ChexpertRuleLabeler  # noqa: E402

GOLD_TO_OBS = {
    "Atelectasis": ("Atelectasis",), "Cardiomegaly": ("Cardiomegaly",), "Pleural Effusion": ("Effusion",),
    "Pneumothorax": ("Pneumothorax",), "No Finding": ("normal",), "Edema": ("Edema",),
    "Consolidation": ("Consolidation",), "Pneumonia": ("Pneumonia",), "Lung Lesion": ("Mass", "Nodule"),
}
GOALS = {"Atelectasis": 0.90, "Cardiomegaly": 0.90, "Pleural Effusion": 0.90, "Pneumothorax": 0.90,
         "No Finding": 0.90, "Edema": 0.85, "Consolidation": 0.85, "Pneumonia": 0.75, "Lung Lesion": 0.75}


def load(data: Path) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    with (data / "indiana_reports_dev.csv").open(newline="", encoding="utf-8") as fh:
        reports = {r["uid"]: f"{r['findings']} {r['impression']}" for r in csv.DictReader(fh)}
    gold_file = next(data.glob("negbio_openi_gold14*.csv"))
    with gold_file.open(newline="", encoding="utf-8") as fh:
        gold = {g["filename"].removeprefix("CXR"): g for g in csv.DictReader(fh)}
    uids = sorted(set(reports) & set(gold), key=int)
    return uids, reports, gold


def score(uids, labels, gold) -> dict:
    out = {}
    for obs, cols in GOLD_TO_OBS.items():
        row = {}
        for name, pos in (("upos", (1, -1)), ("uneg", (1,))):
            tp = fp = fn = 0
            for u in uids:
                y = any(gold[u][c] == "1" for c in cols)
                p = labels[u][obs] in pos
                tp, fp, fn = tp + (y and p), fp + (p and not y), fn + (y and not p)
            pr = tp / (tp + fp) if tp + fp else 0.0
            rc = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            row[name] = {"precision": pr, "recall": rc, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
        row["support"] = sum(any(gold[u][c] == "1" for c in cols) for u in uids)
        out[obs] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", default=str(here / ".." / "shared" / "data" / "iu_xray_dev"))
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--errors", help="print the reports the labeler gets wrong for this observation")
    args = ap.parse_args()
    uids, reports, gold = load(Path(args.data))
    labels = dict(zip(uids, ChexpertRuleLabeler().label([reports[u] for u in uids])))
    res = score(uids, labels, gold)
    print(f"{len(uids)} reports; gold: NegBio OpenI; labeler: chexpert-rules")
    print(f"{'observation':<18} {'support':>7}  {'P+':>6} {'R+':>6} {'F1 (u=pos)':>10}  {'P-':>6} {'R-':>6} "
          f"{'F1 (u=neg)':>10}  goal")
    for obs, r in res.items():
        a, b = r["upos"], r["uneg"]
        print(f"{obs:<18} {r['support']:>7}  {a['precision']:6.3f} {a['recall']:6.3f} {a['f1']:10.3f}  "
              f"{b['precision']:6.3f} {b['recall']:6.3f} {b['f1']:10.3f}  {GOALS[obs]:.2f}")
    if args.errors:
        cols = GOLD_TO_OBS[args.errors]
        for u in uids:
            y = any(gold[u][c] == "1" for c in cols)
            p = labels[u][args.errors] in (1, -1)
            if y != p:
                print(f"\n[{'FN' if y else 'FP'}] uid {u} label={labels[u][args.errors]}: {reports[u]}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "labeler_gold.json").write_text(json.dumps({"n": len(uids), "scores": res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
