"""How fast `data prepare` turns report text into a manifest (the target: 50,000 studies in under a minute
on a 2-core machine).

Writes synthetic inputs in each source's on-disk format, text only (no images: prepare does not read
them), then times the prepare call alone:

    iu-xray     annotation.json + reports CSV + projections CSV
    mimic-cxr   the official layout: split / metadata / chexpert CSVs (gzipped) + one report .txt per study
    csv         an export with a whole-report column parsed into sections

    python benchmarks/prepare_speed.py [--n 50000] [--sources iu-xray,mimic-cxr,csv]

Prints one table line per source and writes prepare_speed.json to $OUT if set, else runs/bench/.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinicalblip.data.iu_xray import prepare_iu_xray  # noqa: E402
from clinicalblip.data.mimic_cxr import prepare_mimic_cxr  # noqa: E402
from clinicalblip.data.tabular import parse_mapping, prepare_table  # noqa: E402

FINDINGS = ["The lungs are clear.", "Heart size is normal.", "No pleural effusion or pneumothorax.",
            "There is XXXX opacity in the right lower lobe.", "Mild degenerative changes of the spine.",
            "The cardiomediastinal silhouette is within normal limits.", "Small left effusion."]
INDICATIONS = ["Chest pain.", "XXXX-year-old male with cough.", "Shortness of breath", "XXXX", "", "Fever."]


def _report(rng: random.Random) -> tuple[str, str, str]:
    return (" ".join(rng.sample(FINDINGS, 3)), rng.choice(INDICATIONS), rng.choice(["No acute disease.", "1. Effusion."]))


def make_iu(d: Path, n: int, rng: random.Random) -> dict:
    ann: dict[str, list] = {"train": [], "val": [], "test": []}
    reports, projections = [], []
    for i in range(n):
        uid = 2 * i + 2
        sid = f"CXR{uid}_IM-{i % 10000:04d}"
        split = "train" if i % 10 < 7 else ("val" if i % 10 == 7 else "test")
        findings, indication, impression = _report(rng)
        ann[split].append({"id": sid, "report": findings, "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
                           "split": split})
        reports.append([uid, "normal", "normal", "PA and lateral", indication, "None.", findings, impression])
        projections += [[uid, f"{uid}_IM-{i % 10000:04d}-1001.dcm.png", "Frontal"],
                        [uid, f"{uid}_IM-{i % 10000:04d}-2001.dcm.png", "Lateral"]]
    (d / "annotation.json").write_text(json.dumps(ann))
    for name, header, rows in [("reports.csv", ["uid", "MeSH", "Problems", "image", "indication", "comparison",
                                                "findings", "impression"], reports),
                               ("projections.csv", ["uid", "filename", "projection"], projections)]:
        with open(d / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return dict(annotation=d / "annotation.json", reports=d / "reports.csv", projections=d / "projections.csv")


def make_mimic(d: Path, n: int, rng: random.Random) -> dict:
    split_rows, meta_rows, chex_rows = [], [], []
    for i in range(n):
        subject, study = f"1{i // 3:07d}", f"5{i:07d}"
        findings, indication, impression = _report(rng)
        folder = d / "files" / f"p{subject[:2]}" / f"p{subject}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{study}.txt").write_text(
            "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            f" INDICATION:  {indication.replace('XXXX', '___')}\n \n COMPARISON:  None.\n \n"
            f" FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}\n")
        split = "train" if i % 10 < 8 else ("validate" if i % 10 == 8 else "test")
        for k, view in enumerate(["PA", "LATERAL"][: 1 + i % 2]):
            dicom = f"{i:08x}-{k}"
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544])
        chex_rows.append([subject, study, "1.0", "", "0.0"])
    for name, header, rows in [
        ("mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows),
        ("mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id",
                                             "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                                             "Columns"], meta_rows),
        ("mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Edema"],
         chex_rows),
    ]:
        with gzip.open(d / name, "wt", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return dict(root=d)


def make_csv(d: Path, n: int, rng: random.Random) -> dict:
    with open(d / "export.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession", "mrn", "split", "image", "report_text"])
        for i in range(n):
            findings, indication, impression = _report(rng)
            w.writerow([f"A{i}", f"M{i // 2}", "train", f"img/{i}.dcm",
                        f"INDICATION: {indication}\nFINDINGS: {findings}\nIMPRESSION: {impression}"])
    return dict(path=d / "export.csv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--sources", default="iu-xray,mimic-cxr,csv")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = []
    print(f"{'source':<10} {'studies':>8} {'make s':>8} {'prepare s':>10} {'studies/s':>10}  under 60 s")
    with tempfile.TemporaryDirectory(prefix="prepare_speed_") as tmp:
        for source in args.sources.split(","):
            d = Path(tmp) / source
            d.mkdir()
            t0 = time.perf_counter()
            inputs = {"iu-xray": make_iu, "mimic-cxr": make_mimic, "csv": make_csv}[source](d, args.n, rng)
            t_make = time.perf_counter() - t0
            out = d / "out" / "manifest.jsonl"
            t0 = time.perf_counter()
            if source == "iu-xray":
                summary = prepare_iu_xray(out=out, **inputs)
            elif source == "mimic-cxr":
                summary = prepare_mimic_cxr(out, **inputs)
            else:
                summary = prepare_table(inputs["path"], out, fmt="csv", mapping=parse_mapping(
                    ["id=accession", "patient_id=mrn", "images=image", "report=report_text"]))
            t_prep = time.perf_counter() - t0
            row = {"source": source, "studies": summary["studies"], "make_s": round(t_make, 2),
                   "prepare_s": round(t_prep, 2), "studies_per_s": round(summary["studies"] / t_prep, 1),
                   "under_60s": t_prep < 60}
            results.append(row)
            print(f"{source:<10} {row['studies']:>8} {t_make:>8.2f} {t_prep:>10.2f} {row['studies_per_s']:>10.0f}"
                  f"  {'yes' if row['under_60s'] else 'NO'}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parents[1] / "runs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "prepare_speed", "n": args.n, "cpus": os.cpu_count(), "python": platform.python_version(),
               "machine": platform.machine(), "results": results}
    (out_dir / "prepare_speed.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out_dir / 'prepare_speed.json'}")
    return 0 if all(r["under_60s"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
