"""Labeler speed: label 4,000 reports with the rule-based CheXpert-style labeler and time it.

    python benchmarks/labeler_speed.py [--n 4000] [--reports PATH]

Reports come from ``--reports`` (a JSONL with "text", or an indiana_reports CSV with findings/impression) or, by
default, ../shared/data/iu_xray_dev/indiana_reports_dev.csv when it exists, else a built-in set of varied
report sentences; they are repeated up to N. Prints one line and writes JSON to $OUT (or ./runs/).
Acceptance: 4,000 reports in under 10 s on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import time
from pathlib import Path

from clinicalblip.metrics.labeler import ChexpertRuleLabeler

_SENTENCES = [
    "The heart is normal in size.", "The heart is mildly enlarged.", "Borderline cardiomegaly.",
    "No pleural effusion or pneumothorax.", "Small left pleural effusion.", "Cannot exclude a small right effusion.",
    "Left basilar atelectasis or scarring.", "The lungs are clear without focal consolidation.",
    "Right lower lobe opacity may represent pneumonia.", "No acute cardiopulmonary abnormality.",
    "Stable calcified granuloma in the right upper lobe.", "Degenerative changes of the thoracic spine.",
    "Right-sided PICC line with tip in the SVC.", "There is a small right apical pneumothorax.",
    "Mild pulmonary edema.", "Healed left rib fractures.", "No change in the moderate right pleural effusion.",
    "The mediastinum is widened.", "A 1 cm nodule in the left lower lobe.", "Pleural thickening at the left base.",
]


def _load_reports(path: Path | None) -> list[str]:
    if path is None:
        dev = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray_dev" / "indiana_reports_dev.csv"
        path = dev if dev.is_file() else None
    if path is None:
        rng = random.Random(0)
        return [" ".join(rng.sample(_SENTENCES, rng.randint(3, 7))) for _ in range(500)]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return [f"{r.get('findings') or ''} {r.get('impression') or ''}" for r in csv.DictReader(fh)]
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line).get("text", "") for line in fh if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--reports", type=Path)
    args = ap.parse_args()
    base = _load_reports(args.reports)
    texts = (base * (args.n // max(1, len(base)) + 1))[: args.n]
    labeler = ChexpertRuleLabeler()
    labeler.label(texts[:10])  # warm-up (regex caches)
    start = time.perf_counter()
    labels = labeler.label(texts)
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "labeler_speed", "labeler": labeler.name, "n_reports": len(texts),
        "distinct_reports": len(set(texts)), "seconds": round(seconds, 4),
        "reports_per_second": round(len(texts) / seconds, 1), "under_10s": seconds < 10.0,
        "mean_chars": round(sum(map(len, texts)) / len(texts), 1),
        "positives": sum(1 for row in labels for v in row.values() if v == 1),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    out_dir = Path(os.environ.get("OUT") or "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "labeler_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"labeler_speed: {len(texts)} reports in {seconds:.2f} s ({result['reports_per_second']:.0f}/s) "
          f"[{'ok' if seconds < 10 else 'SLOW'}: limit 10 s] -> {out_dir / 'labeler_speed.json'}")


if __name__ == "__main__":
    main()
