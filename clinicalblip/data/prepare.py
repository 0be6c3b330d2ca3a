"""What every `data prepare` source shares: reading CSV/JSON inputs with clear errors, writing the manifest,
and the summary printed after it (studies per split, how many carry each kind of clinical context, views).

The sources live in `iu_xray.py`, `mimic_cxr.py` and `tabular.py`; each returns the summary of `finish`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from clinicalblip.data.manifest import SPLITS, write_manifest
from clinicalblip.data.text import normalize_context
from clinicalblip.errors import UserError


class PrepareError(UserError):
    """Input files for `data prepare` that are missing, unreadable or not in the expected format."""


def open_text(path: str | os.PathLike, encoding: str = "utf-8-sig") -> io.TextIOBase:
    """Open a text file, transparently gunzipping `.gz` (MIMIC-CXR ships its CSVs gzipped)."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"file not found: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def read_csv(path: str | os.PathLike, required: tuple[str, ...] = (), encoding: str = "utf-8-sig",
             delimiter: str | None = None) -> list[dict[str, str]]:
    """All rows of a CSV as dicts; a missing required column or a decoding error is a PrepareError."""
    try:
        with open_text(path, encoding) as fh:
            if delimiter is None:
                sample = fh.read(65536)
                fh.seek(0)
                delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
            reader = csv.DictReader(fh, delimiter=delimiter)
            fields = reader.fieldnames or []
            missing = [c for c in required if c not in fields]
            if missing:
                raise PrepareError(
                    f"{path}: missing column(s) {', '.join(missing)}; its columns are: {', '.join(fields) or '(none)'}"
                )
            return list(reader)
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not {encoding} text ({exc.reason} at byte {exc.start}); "
                           "pass --encoding (e.g. cp1252 or latin-1)") from None
    except csv.Error as exc:
        raise PrepareError(f"{path}: malformed CSV ({exc})") from None


def read_json(path: str | os.PathLike):
    try:
        with open_text(path, "utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not UTF-8 ({exc.reason})") from None


def iter_r2gen_annotation(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(split key, entry) pairs of an R2Gen-style annotation.json: {"train": [...], "val": [...], "test": [...]}."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise PrepareError(f"{path}: expected R2Gen format, an object of split name -> list of studies "
                           '({"train": [{"id", "report", "image_path", ...}], ...})')
    for split, entries in data.items():
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry:
                raise PrepareError(f"{path}: entry {i} of '{split}' has no 'id'")
            yield split, entry


def summarize(records: list[dict]) -> dict:
    """Counts that tell whether a prepared manifest is what the user expects."""
    n = len(records)
    splits = Counter(r.get("split") or "(none)" for r in records)
    views = Counter(im.get("view") or "(none)" for r in records for im in r.get("images") or [])
    per_study = Counter(len(r.get("images") or []) for r in records)
    def count(field, fn=lambda v: bool(v)):
        return sum(1 for r in records if fn(r.get(field)))
    informative = lambda v: normalize_context(v) is not None  # noqa: E731
    pct = lambda k: round(100.0 * k / n, 2) if n else 0.0  # noqa: E731
    return {
        "studies": n,
        "splits": {s: splits[s] for s in list(SPLITS) + sorted(set(splits) - set(SPLITS)) if splits[s]},
        "patients": len({r.get("patient_id") for r in records if r.get("patient_id") is not None}),
        "images": sum(views.values()),
        "images_per_study": dict(sorted(per_study.items())),
        "views": dict(views.most_common()),
        "with_findings": count("findings"),
        "with_impression": count("impression"),
        "with_findings_or_impression": sum(1 for r in records if r.get("findings") or r.get("impression")),
        "with_indication": count("indication"),
        "with_indication_pct": pct(count("indication")),
        "with_informative_indication": count("indication", informative),
        "with_informative_indication_pct": pct(count("indication", informative)),
        "with_history": count("history"),
        "with_comparison": count("comparison"),
    }


def finish(records: list[dict], out: str | os.PathLike, source: str, **notes) -> dict:
    """Write the manifest and return its summary (plus source-specific `notes`)."""
    if not records:
        raise PrepareError(f"no studies found for {source}; nothing written to {out}")
    n = write_manifest(records, out)
    summary = {"source": source, "manifest": str(out), **summarize(records), **notes}
    summary["studies"] = n
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines for the CLI."""
    s = summary
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    views = ", ".join(f"{k} {v}" for k, v in s["views"].items()) or "none"
    lines = [
        f"wrote {s['studies']} studies ({splits}) to {s['manifest']}",
        f"  patients {s['patients']}; images {s['images']} (per study: "
        + ", ".join(f"{k}: {v}" for k, v in s["images_per_study"].items()) + f"); views: {views}",
        f"  findings {s['with_findings']}, impression {s['with_impression']}, neither "
        f"{s['studies'] - s['with_findings_or_impression']}",
        f"  indication {s['with_indication']} ({s['with_indication_pct']} %; informative for prompts "
        f"{s['with_informative_indication_pct']} %), history {s['with_history']}, comparison {s['with_comparison']}",
    ]
    skip = {"source", "manifest", "splits", "views", "images_per_study"} | {k for k in s if k.startswith("with_")}
    skip |= {"studies", "patients", "images"}
    notes = {k: v for k, v in s.items() if k not in skip}
    if notes:
        lines.append("  " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in notes.items()))
    return "\n".join(lines)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """"0.7,0.1,0.2" -> train/val/test fractions (three non-negative numbers summing to 1)."""
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise PrepareError(f"--ratios {text!r}: expected three numbers train,val,test such as 0.7,0.1,0.2") from None
    if len(parts) != 3 or any(not (0.0 <= p <= 1.0) for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise PrepareError(f"--ratios {text!r}: expected three fractions train,val,test in [0, 1] summing to 1 "
                           "(e.g. 0.7,0.1,0.2)")
    return parts[0], parts[1], parts[2]


def assign_splits(records: list[dict], by: str = "patient_id", ratios=(0.7, 0.1, 0.2), seed: int = 0) -> dict:
    """Give every record without a split one of train/val/test, whole groups at a time (no patient in two splits).

    The groups (distinct values of `by`) are shuffled with `seed` and cut at the ratios, so a split's share of
    groups is exact (rounded), not left to chance on a small export. Records that already have a split keep it;
    a group with one already keeps that split for all its records. Returns {split: groups assigned}.
    """
    import random

    missing = [r["id"] for r in records if not r.get("split") and r.get(by) in (None, "")]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise PrepareError(f"--split-by {by}: {len(missing)} record(s) have no {by} ({shown}); map it with "
                           f"--map {by}=COLUMN, or split by study with --split-by id")
    fixed = {}
    for r in records:
        if r.get("split"):
            fixed.setdefault(str(r[by]) if r.get(by) not in (None, "") else None, r["split"])
    groups = sorted({str(r[by]) for r in records if not r.get("split")} - set(fixed))
    random.Random(seed).shuffle(groups)
    n = len(groups)
    sizes = [round(r * n) for r in ratios[:2]]
    sizes.append(n - sum(sizes))
    if sizes[2] < 0:
        sizes[0] += sizes[2]
        sizes[2] = 0
    for i, r in enumerate(ratios):  # a requested split gets at least one group when there are enough
        if r > 0 and sizes[i] == 0 and n >= sum(1 for x in ratios if x > 0):
            big = max(range(3), key=lambda j: sizes[j])
            sizes[big] -= 1
            sizes[i] = 1
    n_train, n_val = sizes[0], sizes[1]
    chosen = {g: "train" for g in groups[:n_train]}
    chosen.update({g: "val" for g in groups[n_train:n_train + n_val]})
    chosen.update({g: "test" for g in groups[n_train + n_val:]})
    chosen.update(fixed)
    for r in records:
        if not r.get("split"):
            r["split"] = chosen[str(r[by])]
    counts = Counter(chosen[g] for g in groups)
    return {s: counts.get(s, 0) for s in SPLITS}
