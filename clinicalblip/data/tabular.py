"""A hospital's own export (CSV or JSON Lines) -> manifest, with a column mapping.

    clinicalblip data prepare csv export.csv --map id=accession --map findings=report_text \
        --map images=frontal_path,lateral_path --map patient_id=mrn_hash --out manifest.jsonl

Targets: id, patient_id, split, images, views, indication, history, comparison, findings, impression,
report, age and sex (the templates' {age} and {sex} slots), and the prior study's link: prior_id (another row's id),
study_date, interval_days. A target that is not mapped is read from the column of the same name when there is one (images also
from image / image_path / image_paths / path, views from view). `report` is a whole free-text report, split
into sections the MIMIC-CXR way (sections.py); its sections fill the fields not mapped explicitly, and a
report without headers becomes the findings.

Images: a cell may hold one path, several separated by ";" or "|", or a JSON list; in JSON Lines also a list
of paths or of {"path", "view"} objects. Several image columns can be mapped at once (images=a,b). Views, when
mapped, line up with the images in order. Relative paths are resolved against --images (default: the input
file's folder) and stored relative to the manifest's folder; absolute paths are kept absolute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clinicalblip.data.manifest import join_manifest_path, manifest_path_prefix, normalize_split
from clinicalblip.data.prepare import PrepareError, assign_splits, finish, open_text, read_csv
from clinicalblip.data.sections import report_fields
from clinicalblip.data.text import tidy_text
from clinicalblip.data.views import normalize_view
from clinicalblip.jsonl import iter_json_objects

TARGETS = ("id", "patient_id", "split", "images", "views", "indication", "history", "comparison", "findings",
           "impression", "report", "age", "sex", "prior_id", "study_date", "interval_days")
_PRIOR = ("prior_id", "study_date", "interval_days")  # the prior study (clinicalblip/data/priors.py)
_TEXT = ("indication", "history", "comparison", "findings", "impression")
_DEFAULT_COLUMNS = {
    "images": ("images", "image", "image_path", "image_paths", "path"),
    "views": ("views", "view"),
}


def parse_mapping(items: list[str] | None) -> dict[str, list[str]]:
    """["findings=report_text", "images=a,b"] -> {"findings": ["report_text"], "images": ["a", "b"]}."""
    mapping: dict[str, list[str]] = {}
    for item in items or []:
        target, sep, cols = item.partition("=")
        target = target.strip()
        if not sep or not target or not cols.strip():
            raise PrepareError(f"--map expects TARGET=COLUMN (e.g. findings=report_text), got {item!r}")
        if target not in TARGETS:
            raise PrepareError(f"--map {item!r}: unknown target {target!r}; targets are {', '.join(TARGETS)}")
        mapping[target] = [c.strip() for c in cols.split(",") if c.strip()]
    return mapping


def _read_jsonl(path: Path, encoding: str) -> list[dict]:
    rows = []
    try:
        with open_text(path, encoding) as fh:
            head = fh.read(1 << 16).lstrip()
            fh.seek(0)
            if head.startswith("["):  # a JSON array is accepted too
                data = json.load(fh)
                if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                    raise PrepareError(f"{path}: expected a list of objects")
                return data
            rows.extend(row for _, row in iter_json_objects(fh, path, PrepareError))
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not {encoding} text ({exc.reason}); pass --encoding") from None
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return rows


def _split_cell(value) -> list:
    """A cell holding zero, one or several items (paths or views)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [v for v in value if v not in (None, "")]
    if isinstance(value, float) and value != value:
        return []
    s = str(value).strip()
    if not s:
        return []
    if s.startswith("["):
        try:
            data = json.loads(s)
            if isinstance(data, list):
                return [v for v in data if v not in (None, "")]
        except json.JSONDecodeError:
            pass
    for sep in (";", "|"):
        if sep in s:
            return [p.strip() for p in s.split(sep) if p.strip()]
    return [s]


def prepare_table(path: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None,
                  mapping: dict[str, list[str]] | None = None, images: str | os.PathLike | None = None,
                  split: str | None = None, encoding: str = "utf-8-sig", delimiter: str | None = None,
                  keep_columns: bool = False, split_by: str | None = None, ratios=(0.7, 0.1, 0.2),
                  seed: int = 0) -> dict:
    """Write a manifest from a CSV / JSONL export; `mapping` is parse_mapping's result. Returns the summary.

    `split` is used for rows without a split column / value (e.g. "test" for a set to generate on).
    `split_by` ("patient_id" or "id"): rows without a split get train/val/test by `ratios`, whole patients (or
    studies) at a time, shuffled with `seed` (prepare.assign_splits).
    `keep_columns` stores the unmapped columns as extra keys.
    """
    if split_by is not None and split is not None:
        raise PrepareError("give either --split (one split for rows without one) or --split-by (a seeded "
                           "train/val/test split), not both")
    if split_by not in (None, "patient_id", "id"):
        raise PrepareError(f"--split-by {split_by!r}: split by patient_id (no patient in two splits) or id")
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") or path.name.endswith((".csv.gz", ".tsv.gz"))
                  else "jsonl")
    rows = read_csv(path, encoding=encoding, delimiter=delimiter) if fmt == "csv" else _read_jsonl(path, encoding)
    if not rows:
        raise PrepareError(f"{path}: no rows")
    columns: list[str] = list(dict.fromkeys(k for r in rows[:1000] for k in r))
    mapping = dict(mapping or {})
    for target in TARGETS:
        if target in mapping:
            continue
        for cand in _DEFAULT_COLUMNS.get(target, (target,) if target != "report" else ()):
            if cand in columns:
                mapping[target] = [cand]
                break
    missing = sorted({c for cols in mapping.values() for c in cols if c not in columns})
    if missing:
        raise PrepareError(f"{path}: column(s) {', '.join(missing)} not found; columns are: {', '.join(columns)}")
    if "id" not in mapping:
        raise PrepareError(f"{path}: no 'id' column; name the study identifier with --map id=COLUMN "
                           f"(columns: {', '.join(columns)})")
    used = {c for cols in mapping.values() for c in cols}
    image_root = Path(images) if images else path.resolve().parent
    default_split = normalize_split(split)

    def get(row, target):
        cols = mapping.get(target)
        return row.get(cols[0]) if cols else None

    prefix = manifest_path_prefix(image_root, out)
    records, no_id = [], []
    for i, row in enumerate(rows, 1):
        rid = get(row, "id")
        rid = None if rid is None else str(rid).strip()
        if rid and rid.endswith(".0") and rid[:-2].isdigit():
            rid = rid[:-2]
        if not rid:
            no_id.append(i)
            continue
        image_items = [it for col in mapping.get("images", []) for it in _split_cell(row.get(col))]
        view_items = [v for col in mapping.get("views", []) for v in _split_cell(row.get(col))]
        imgs = []
        for k, it in enumerate(image_items):
            view = it.get("view") if isinstance(it, dict) else None
            p = it.get("path") if isinstance(it, dict) else it
            if p is None:
                continue
            if view is None and k < len(view_items):
                view = view_items[k]
            given = Path(str(p)).expanduser()
            # Absolute paths in the export stay absolute (they point into a PACS mount or the like).
            stored = str(given) if given.is_absolute() else join_manifest_path(prefix, str(p))
            imgs.append({"path": stored, "view": normalize_view(view)})
        fields = {k: tidy_text(get(row, k)) for k in _TEXT}
        if "report" in mapping:
            parsed = report_fields(get(row, "report"))
            for k in _TEXT:
                if k not in mapping or not fields[k]:
                    fields[k] = fields[k] or tidy_text(parsed.get(k))
        pid = get(row, "patient_id")
        pid = None if pid is None or str(pid).strip() == "" else str(pid).strip()
        rec = {"id": rid, "patient_id": pid, "split": normalize_split(get(row, "split")) or default_split,
               "images": imgs, **fields}
        for k in ("age", "sex"):
            v = get(row, k)
            v = None if v is None or (isinstance(v, float) and v != v) else str(v).strip()
            if v:
                rec[k] = int(v) if k == "age" and v.isdigit() else v  # "63" and 63 render alike in prompts
        for k in _PRIOR:
            v = get(row, k)
            if v not in (None, "") and str(v).strip():
                v = str(v).strip()
                if k == "prior_id" and v.endswith(".0") and v[:-2].isdigit():
                    v = v[:-2]
                rec[k] = int(float(v)) if k == "interval_days" and v.replace(".", "", 1).isdigit() else v
        if keep_columns:
            for k, v in row.items():
                if k not in used and k not in rec:
                    rec[k] = v
        records.append(rec)
    if no_id:
        shown = ", ".join(map(str, no_id[:10])) + (f" (+{len(no_id) - 10} more)" if len(no_id) > 10 else "")
        raise PrepareError(f"{path}: {len(no_id)} row(s) without an id (rows {shown})")
    notes = {}
    if split_by is not None and records:
        groups = assign_splits(records, by=split_by, ratios=ratios, seed=seed)
        notes["split_by"] = (f"{split_by}, seed {seed}: " + ", ".join(f"{s} {n}" for s, n in groups.items())
                             + (" patients" if split_by == "patient_id" else " studies"))
    return finish(records, out, fmt, mapping=", ".join(f"{k}={'+'.join(v)}" for k, v in mapping.items()), **notes)
