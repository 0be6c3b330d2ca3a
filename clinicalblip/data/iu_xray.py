"""IU X-Ray (Indiana University / Open-i) -> manifest.

Inputs, matched by uid (the number in R2Gen's id "CXR2384_IM-0942" is the CSVs' uid 2384):

- R2Gen's `annotation.json` (required): the official split and `report` = the FINDINGS section, stored
  unchanged as `findings`. Every annotation study becomes one manifest record, in annotation order.
- `indiana_reports.csv` (optional): indication, comparison, impression (tidied: whitespace collapsed,
  "None." -> absent; `XXXX` de-identification marks kept as written, the prompt normaliser handles them).
  IU has no separate history section; the indication often carries it ("XXXX-year-old male with history
  of ..."). The `MeSH` terms are kept as the extra key `mesh`.
- `indiana_projections.csv` (optional): "Frontal" / "Lateral" per image file -> views "FRONTAL" / "LATERAL"
  (IU does not record PA vs AP, so "FRONTAL" rather than guessing; see views.py).

Images: R2Gen stores two images per study as `<id>/0.png`, `<id>/1.png` under `images/` beside
annotation.json (the default for `--images`). Their views come from the projections of the study's
`<uid>_<IM-nnnn>-*` files: when the counts agree, the k-th file in name order is image k; when the study has
more files than R2Gen kept (3-4 images in ~6 % of studies) and they include both projections, image 0 is the
frontal and image 1 the lateral (R2Gen's selection keeps one of each). If `--images` points at the Open-i /
Kaggle layout instead (the projections' file names, e.g. `2_IM-0652-1001.dcm.png`, directly in the folder),
every projection file of the study is used. patient_id is the uid (IU has one study per patient).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from clinicalblip.data.manifest import join_manifest_path, manifest_path_prefix, normalize_split
from clinicalblip.data.prepare import finish, iter_r2gen_annotation, read_csv
from clinicalblip.data.text import tidy_text
from clinicalblip.data.views import normalize_view

_ID_RE = re.compile(r"^CXR(\d+)(?:_(IM-\d+))?")


def _uid_and_im(study_id: str) -> tuple[str | None, str | None]:
    m = _ID_RE.match(str(study_id))
    return (m.group(1), m.group(2)) if m else (None, None)


def _projections(path) -> dict[str, list[tuple[str, str | None]]]:
    """uid -> [(file name, view)] sorted by file name."""
    by_uid: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for row in read_csv(path, required=("uid", "filename", "projection")):
        by_uid[row["uid"].strip()].append((row["filename"].strip(), normalize_view(row["projection"])))
    for rows in by_uid.values():
        rows.sort()
    return by_uid


def _study_files(uid: str, im: str | None, proj: dict) -> list[tuple[str, str | None]]:
    rows = proj.get(uid, [])
    if im:
        same = [r for r in rows if r[0].startswith(f"{uid}_{im}-")]
        if same:
            return same
    return rows


def _r2gen_views(n_images: int, files: list[tuple[str, str | None]]) -> list[str | None]:
    views = [v for _, v in files]
    if len(views) == n_images:
        return views
    if n_images == 2 and "FRONTAL" in views and "LATERAL" in views:
        return ["FRONTAL", "LATERAL"]
    return (views + [None] * n_images)[:n_images]


def prepare_iu_xray(annotation: str | os.PathLike, out: str | os.PathLike, reports: str | os.PathLike | None = None,
                    projections: str | os.PathLike | None = None, images: str | os.PathLike | None = None) -> dict:
    """Write the IU X-Ray manifest to `out`; returns the summary (see prepare.summarize)."""
    annotation = Path(annotation)
    entries = list(iter_r2gen_annotation(annotation))
    report_rows: dict[str, dict] = {}
    if reports:
        for row in read_csv(reports, required=("uid", "indication", "comparison", "findings", "impression")):
            report_rows[row["uid"].strip()] = row
    proj = _projections(projections) if projections else {}
    image_root = Path(images) if images else annotation.parent / "images"

    # Open-i / Kaggle layout: the projection file names sit directly in the image folder.
    openi = False
    if images and proj and entries:
        first = entries[0][1]
        r2gen_first = image_root / (first.get("image_path") or [""])[0]
        uid, im = _uid_and_im(first["id"])
        files = _study_files(uid, im, proj) if uid else []
        openi = not r2gen_first.is_file() and bool(files) and (image_root / files[0][0]).is_file()

    prefix = manifest_path_prefix(image_root, out)
    records, unmatched_reports, unmatched_views, views_by_rule = [], 0, 0, 0
    for split_key, e in entries:
        sid = str(e["id"])
        uid, im = _uid_and_im(sid)
        uid = str(e.get("uid") or uid or sid)
        row = report_rows.get(uid)
        if reports and row is None:
            unmatched_reports += 1
        files = _study_files(uid, im, proj) if proj else []
        if proj and not files:
            unmatched_views += 1
        if openi:
            image_list = [(f, v) for f, v in files]
        else:
            paths = e.get("image_path") or []
            if isinstance(paths, str):
                paths = [paths]
            views = _r2gen_views(len(paths), files) if files else [None] * len(paths)
            if files and len(files) != len(paths):
                views_by_rule += 1
            image_list = list(zip(paths, views))
        rec = {
            "id": sid,
            "patient_id": uid,
            "split": normalize_split(e.get("split") or split_key),
            "images": [{"path": join_manifest_path(prefix, p), "view": v} for p, v in image_list],
            "indication": tidy_text(row.get("indication")) if row else None,
            "history": None,
            "comparison": tidy_text(row.get("comparison")) if row else None,
            "findings": e.get("report"),
            "impression": tidy_text(row.get("impression")) if row else None,
        }
        if row and tidy_text(row.get("MeSH")):
            rec["mesh"] = tidy_text(row.get("MeSH"))
        records.append(rec)
    notes = {"image_layout": "openi" if openi else "r2gen"}
    if reports:
        notes["studies_without_report_row"] = unmatched_reports
    if projections:
        notes["studies_without_projections"] = unmatched_views
        notes["views_by_frontal_lateral_rule"] = views_by_rule
    if not reports and not projections:
        # Without the CSVs there is no indication or view: say so rather than let it pass unnoticed.
        notes["hint"] = "no --reports/--projections: indication, impression and views are absent"
    notes["priors"] = "none (IU X-Ray has no study dates or links between studies: no study gets a prior)"
    return finish(records, out, "iu-xray", **notes)
