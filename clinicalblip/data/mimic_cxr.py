"""MIMIC-CXR -> manifest, from R2Gen's annotation.json or from the official PhysioNet layout.

Official layout (MIMIC-CXR 2.x and MIMIC-CXR-JPG 2.x; CSVs may be gzipped):

    ROOT/mimic-cxr-2.0.0-split.csv       dicom_id, study_id, subject_id, split (train / validate / test)
    ROOT/mimic-cxr-2.0.0-metadata.csv    dicom_id, ..., ViewPosition (PA, AP, LATERAL, LL, ...)
    ROOT/mimic-cxr-2.0.0-chexpert.csv    subject_id, study_id, 14 observations (1.0 / 0.0 / -1.0 / blank), optional
    REPORTS/files/p10/p10000032/s50414267.txt
    IMAGES/files/p10/p10000032/s50414267/<dicom_id>.jpg   (or .dcm for the DICOM release)

One record per study: id "s<study_id>", patient_id "p<subject_id>", split "validate" -> "val", images of the
study (frontal views first, then laterals, then others) with views from the metadata's ViewPosition (see
views.py), text fields from the report's sections (sections.py: the official section parser's rules;
"___" de-identification marks kept as written). CheXpert labels, when given, become the extra key `chexpert`
({observation: 1 / 0 / -1}, blanks left out).

R2Gen's annotation.json (one entry per image or per study, each with `study_id`, `subject_id`, `report`,
`image_path` relative to its `images/` folder): entries are grouped by study, `findings` is the annotation's
`report` unchanged, and when report files / metadata / CheXpert CSVs are also given, the study's other
sections, views and labels are added from them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from clinicalblip.data.manifest import join_manifest_path, manifest_path_prefix, normalize_split
from clinicalblip.data.prepare import PrepareError, finish, iter_r2gen_annotation, read_csv
from clinicalblip.data.sections import report_fields
from clinicalblip.data.views import normalize_view, view_order

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)


def find_official_file(root: str | os.PathLike, kind: str) -> Path | None:
    """ROOT/mimic-cxr-<version>-<kind>.csv[.gz] (kind: split, metadata, chexpert, negbio), newest version first."""
    root = Path(root)
    hits = sorted(root.glob(f"mimic-cxr-*-{kind}.csv*"), reverse=True)
    hits = [h for h in hits if h.name.endswith((".csv", ".csv.gz"))]
    return hits[0] if hits else None


def _files_dir(path: Path) -> Path:
    """Accept either the folder that holds `files/` or `files/` itself."""
    return path if path.name == "files" else path / "files"


def _pdir(subject: str) -> str:
    return f"p{subject[:2]}"


def study_folder(subject_id: str, study_id: str) -> str:
    """files/-relative folder of a study: p10/p10000032/s50414267."""
    return f"{_pdir(subject_id)}/p{subject_id}/s{study_id}"


def _clean_id(value) -> str:
    s = str(value).strip()
    if s.endswith(".0"):  # ids written by pandas as floats
        s = s[:-2]
    return s.lstrip("ps") if s[:1] in ("p", "s") and s[1:].isdigit() else s


def _read_metadata(path) -> dict[str, str | None]:
    return {r["dicom_id"].strip(): normalize_view(r.get("ViewPosition"))
            for r in read_csv(path, required=("dicom_id", "ViewPosition"))}


def _read_chexpert(path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in read_csv(path, required=("study_id",)):
        labels = {}
        for name in CHEXPERT_LABELS:
            v = (r.get(name) or "").strip()
            if v:
                try:
                    labels[name] = int(float(v))
                except ValueError:
                    continue
        out[_clean_id(r["study_id"])] = labels
    return out


def _read_report(reports_files: Path | None, subject: str, study: str) -> str | None:
    if reports_files is None:
        return None
    path = reports_files / f"{study_folder(subject, study)}.txt"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _detect_image_ext(images_files: Path, probes: list[tuple[str, str, str]]) -> str:
    """'jpg' or 'dcm', whichever exists for the first studies probed (jpg if none is found)."""
    for subject, study, dicom in probes[:20]:
        folder = images_files / study_folder(subject, study)
        for ext in ("jpg", "dcm", "png"):
            if (folder / f"{dicom}.{ext}").is_file():
                return ext
    return "jpg"


def prepare_mimic_cxr(out: str | os.PathLike, root: str | os.PathLike | None = None,
                      annotation: str | os.PathLike | None = None, split_csv: str | os.PathLike | None = None,
                      metadata: str | os.PathLike | None = None, chexpert: str | os.PathLike | None = None,
                      reports: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                      image_ext: str | None = None, drop_empty: bool = False) -> dict:
    """Write the MIMIC-CXR manifest to `out`; returns the summary.

    `root` is where the official CSVs are looked up (and the default for `reports` and `images`).
    With `annotation` (R2Gen format) the split and findings come from it; otherwise from `split_csv` and the
    report files. `image_ext` "jpg" | "dcm" | None (detected). `drop_empty` leaves out studies whose report has
    neither findings nor impression (otherwise `data check` reports them).
    """
    root = Path(root) if root else None
    if root is not None and not root.is_dir():
        raise PrepareError(f"--root is not a folder: {root}")
    if root is not None:
        split_csv = split_csv or find_official_file(root, "split")
        metadata = metadata or find_official_file(root, "metadata")
        chexpert = chexpert or find_official_file(root, "chexpert")
        if reports is None:
            for cand in (root, root / "mimic-cxr-reports"):
                if (cand / "files").is_dir():
                    reports = cand
                    break
    if annotation is None and split_csv is None:
        raise PrepareError("mimic-cxr needs --annotation (R2Gen annotation.json) or the official "
                           "mimic-cxr-2.0.0-split.csv (--split-csv, or --root with the CSVs in it)")
    reports_files = _files_dir(Path(reports)) if reports else None
    if reports_files is not None and not reports_files.is_dir():
        raise PrepareError(f"report folder not found: {reports_files}")
    views = _read_metadata(metadata) if metadata else {}
    labels = _read_chexpert(chexpert) if chexpert else {}

    if annotation is not None:
        studies, image_root = _studies_from_r2gen(Path(annotation), images)
    else:
        studies = _studies_from_split_csv(split_csv)
        base = Path(images) if images else (root or Path(split_csv).parent)
        image_root = _files_dir(base)
        probes = [(s["subject"], s["study"], d) for s in studies.values() for d in s["dicoms"][:1]]
        ext = image_ext or _detect_image_ext(image_root, probes)
        for s in studies.values():
            s["paths"] = [f"{study_folder(s['subject'], s['study'])}/{d}.{ext}" for d in s["dicoms"]]

    prefix = manifest_path_prefix(image_root, out)
    records, missing_reports, dropped = [], 0, 0
    for key, s in studies.items():
        study, subject = s["study"], s["subject"]
        text = _read_report(reports_files, subject, study) if subject else None
        if reports_files is not None and text is None:
            missing_reports += 1
        fields = report_fields(text) if text else dict.fromkeys(
            ("indication", "history", "comparison", "findings", "impression"))
        if s.get("findings") is not None:  # R2Gen: its report is the findings, verbatim
            fields["findings"] = s["findings"]
        if drop_empty and not (fields["findings"] or fields["impression"]):
            dropped += 1
            continue
        imgs = []
        for path, dicom in zip(s["paths"], s["dicoms"]):
            imgs.append({"path": join_manifest_path(prefix, path), "view": views.get(dicom)})
        imgs.sort(key=lambda im: view_order(im["view"]))
        rec = {
            "id": f"s{study}" if study.isdigit() else key,
            "patient_id": f"p{subject}" if subject else None,
            "split": s["split"],
            "images": imgs,
            **fields,
        }
        if study in labels:
            rec["chexpert"] = labels[study]
        records.append(rec)
    notes = {"layout": "r2gen" if annotation is not None else "official"}
    notes.update(_link_priors(records, studies, metadata))
    if reports_files is not None:
        notes["studies_without_report_file"] = missing_reports
    else:
        notes["hint"] = ("no report files (--reports / --root): indication, history, comparison and impression are "
                         "absent")
    if metadata is None:
        notes["view_labels"] = "none (no metadata CSV)"
    if drop_empty:
        notes["dropped_empty_reports"] = dropped
    return finish(records, out, "mimic-cxr", **notes)


def _read_study_times(path) -> dict[str, tuple[str, str]]:
    """dicom_id -> (StudyDate as YYYY-MM-DD or "", StudyTime as HHMMSS.fff or "") from the metadata CSV."""
    out = {}
    for r in read_csv(path, required=("dicom_id",)):
        d = (r.get("StudyDate") or "").strip()
        if d.endswith(".0"):
            d = d[:-2]
        t = (r.get("StudyTime") or "").strip()
        if t and "." in t:  # pandas writes 91032.5: zero-pad the whole seconds so times sort as text
            whole, _, frac = t.partition(".")
            t = whole.zfill(6) + "." + frac
        elif t:
            t = t.zfill(6)
        out[r["dicom_id"].strip()] = (f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else "", t)
    return out


def _link_priors(records: list[dict], studies, metadata) -> dict:
    """Each study's prior: the same subject's latest earlier study (StudyDate + StudyTime of the metadata CSV;
    same-day studies ordered by time). Missing dates are said once, in the summary, and counted."""
    from clinicalblip.data.priors import link_by_date

    if metadata is None:
        return {"priors": "not linked (no metadata CSV with StudyDate/StudyTime)"}
    dicom_times = _read_study_times(metadata)
    times = {}
    for key, s in studies.items():
        rid = f"s{s['study']}" if s["study"].isdigit() else key
        found = [dicom_times[d] for d in s["dicoms"] if d in dicom_times and dicom_times[d][0]]
        if found:
            times[rid] = min(found)
    counts = link_by_date(records, times)
    notes = {"studies_with_prior": counts["linked"]}
    if counts["without_date"]:
        notes["studies_without_date"] = (f"{counts['without_date']} (no StudyDate in the metadata: neither linked "
                                         "to a prior nor used as one)")
    if counts["prior_in_other_split"]:
        notes["priors_in_another_split_not_linked"] = counts["prior_in_other_split"]
    return notes


def _studies_from_split_csv(split_csv) -> "OrderedDict[str, dict]":
    studies: OrderedDict[str, dict] = OrderedDict()
    for r in read_csv(split_csv, required=("dicom_id", "study_id", "subject_id", "split")):
        study, subject = _clean_id(r["study_id"]), _clean_id(r["subject_id"])
        s = studies.get(study)
        if s is None:
            s = studies[study] = {"study": study, "subject": subject, "split": normalize_split(r["split"]),
                                  "dicoms": []}
        s["dicoms"].append(r["dicom_id"].strip())
    return studies


def _studies_from_r2gen(annotation: Path, images) -> tuple["OrderedDict[str, dict]", Path]:
    image_root = Path(images) if images else annotation.parent / "images"
    studies: OrderedDict[str, dict] = OrderedDict()
    for split_key, e in iter_r2gen_annotation(annotation):
        study = _clean_id(e.get("study_id") or e["id"])
        subject = _clean_id(e["subject_id"]) if e.get("subject_id") is not None else None
        paths = e.get("image_path") or []
        if isinstance(paths, str):
            paths = [paths]
        s = studies.get(study)
        if s is None:
            s = studies[study] = {"study": study, "subject": subject,
                                  "split": normalize_split(e.get("split") or split_key),
                                  "findings": e.get("report"), "paths": [], "dicoms": []}
        for p in paths:
            if p not in s["paths"]:
                s["paths"].append(p)
                s["dicoms"].append(Path(p).stem)
    return studies, image_root
