"""The official IU X-Ray distribution (NLM Open-i) -> manifest: `data prepare open-i`.

Reports: `NLMCXR_reports.tgz` (read as it is, no unpacking) or its unpacked folder, one XML per report
(`ecgen-radiology/N.xml`) with

    <uId id="CXR2"/>                                   the study (IU has one study per patient)
    <AbstractText Label="COMPARISON|INDICATION|FINDINGS|IMPRESSION">   the sections (empty element: absent)
    <MeSH><major>..</major><minor>..</minor></MeSH>    coded findings -> the extra key `mesh`, "term;term"
                                                       (major then minor, as indiana_reports.csv writes it)
    <parentImage id="CXR2_IM-0652-1001">               one per image, in the report's order

Images (`--images DIR`, searched recursively once) may come in any of the published layouts:
`NLMCXR_png/CXR2_IM-0652-1001.png`, the Kaggle `images_normalized/2_IM-0652-1001.dcm.png` (the "CXR" prefix
and a "_k" after the uid dropped: CXR1_1_IM-0001-3001 -> 1_IM-0001-3001), or DICOM (`.dcm`, either name).

Views: from `--projections` (indiana_projections.csv: uid, filename, projection Frontal/Lateral ->
FRONTAL/LATERAL), else a DICOM image's ViewPosition (PA/AP/LL...), else unknown (said once in the summary).

Kept out, counted with the reason: reports without any image (listed or found on disk), reports without
findings (the FINDINGS section is the report the model learns, as in R2Gen), and with `--annotation`
reports that R2Gen's annotation does not list.

Splits: R2Gen's own (`--annotation annotation.json`; its ids `CXR<uid>_IM-xxxx` are matched by uid and kept
as the record ids). Otherwise a seeded split by patient, train/val/test = 70/10/20 % (R2Gen's ratios for IU
X-Ray), decided per patient by a hash of (seed, patient id): stable when reports are added or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterator

from clinicalblip.data.manifest import manifest_relative_path, normalize_split
from clinicalblip.data.prepare import PrepareError, finish, iter_r2gen_annotation, read_csv
from clinicalblip.data.text import tidy_text
from clinicalblip.data.views import normalize_view

SPLIT_RATIOS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
SECTIONS = {"COMPARISON": "comparison", "INDICATION": "indication", "FINDINGS": "findings", "IMPRESSION": "impression"}
_IMAGE_ID_RE = re.compile(r"^CXR(\d+)(?:_\d+)?_(IM-\d+(?:-\d+)+)$")
_UID_RE = re.compile(r"(\d+)")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def parse_report_xml(data: bytes | str, name: str = "") -> dict:
    """One Open-i report XML -> {uid, sections..., mesh, image_ids, caption}."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PrepareError(f"{name}: not valid XML ({exc})") from None
    uid_el = root.find("uId")
    raw_uid = (uid_el.get("id") if uid_el is not None else None) or Path(name).stem
    m = _UID_RE.search(raw_uid or "")
    if not m:
        raise PrepareError(f"{name}: no report id (<uId id=...>)")
    out = {"uid": m.group(1), "source": name}
    for el in root.iter("AbstractText"):
        key = SECTIONS.get((el.get("Label") or "").upper())
        if key:
            out[key] = tidy_text("".join(el.itertext()))
    mesh = root.find("MeSH")
    terms = []
    if mesh is not None:
        terms = [tidy_text(el.text) for tag in ("major", "minor") for el in mesh.findall(tag)]
    out["mesh"] = ";".join(t for t in terms if t) or None
    images = root.findall("parentImage")
    out["image_ids"] = [el.get("id") for el in images if el.get("id")]
    caption = images[0].find("caption") if images else None
    out["caption"] = tidy_text(caption.text) if caption is not None else None
    return out


def iter_report_xmls(reports: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(name, XML bytes) of every report in NLMCXR_reports.tgz or a folder holding the XMLs."""
    path = Path(reports)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"), key=lambda p: (len(p.stem), p.stem, str(p)))
        if not files:
            raise PrepareError(f"{path}: no report XML files (expected ecgen-radiology/N.xml)")
        for f in files:
            yield str(f.relative_to(path)), f.read_bytes()
        return
    if not path.is_file():
        raise PrepareError(f"--reports {path}: neither NLMCXR_reports.tgz nor a folder")
    try:
        with tarfile.open(path, "r:*") as tar:
            n = 0
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        n += 1
                        yield member.name, fh.read()
            if not n:
                raise PrepareError(f"{path}: the archive holds no report XML files")
    except tarfile.TarError as exc:
        raise PrepareError(f"{path}: not a readable tar archive ({exc})") from None


def image_key(name: str) -> str | None:
    """The parentImage id a file name stands for, in any published layout ("2_IM-0652-1001.dcm.png",
    "CXR2_IM-0652-1001.png", "CXR1_1_IM-0001-3001.dcm" -> "CXR2_IM-0652-1001" ...); None if it is none."""
    base = os.path.basename(name)
    lower = base.lower()
    while True:  # ".dcm.png": strip every image suffix
        for suf in _IMAGE_SUFFIXES:
            if lower.endswith(suf):
                base, lower = base[: -len(suf)], lower[: -len(suf)]
                break
        else:
            break
    m = _IMAGE_ID_RE.match(base if base.startswith("CXR") else "CXR" + base)
    return f"{m.group(1)}_{m.group(2)}" if m else None


def _image_index(images: Path) -> dict[str, str]:
    """normalised image id (uid_IM-xxxx-yyyy) -> file path, PNG/JPEG preferred over DICOM."""
    found: dict[str, str] = {}
    rank = {".png": 0, ".jpg": 1, ".jpeg": 1, ".dcm": 2, ".dicom": 2}
    for dirpath, _, names in os.walk(images):
        for n in names:
            key = image_key(n)
            if key is None:
                continue
            p = os.path.join(dirpath, n)
            old = found.get(key)
            if old is None or rank.get(Path(n).suffix.lower(), 9) < rank.get(Path(old).suffix.lower(), 9):
                found[key] = p
    return found


def _projections(path) -> dict[str, str | None]:
    return {image_key(r["filename"].strip()): normalize_view(r["projection"])
            for r in read_csv(path, required=("uid", "filename", "projection")) if image_key(r["filename"].strip())}


def _dicom_view(path: str) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["ViewPosition"])
    except Exception:
        return None
    return normalize_view(ds.get("ViewPosition"))


def seeded_split(patient: str, seed: int = 0) -> str:
    """train / val / test by SPLIT_RATIOS from a hash of (seed, patient): the same patient, the same split."""
    h = hashlib.blake2b(f"{seed}:{patient}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    acc = 0.0
    for name, ratio in SPLIT_RATIOS:
        acc += ratio
        if u < acc:
            return name
    return SPLIT_RATIOS[-1][0]


def prepare_open_i(reports: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                   annotation: str | os.PathLike | None = None, projections: str | os.PathLike | None = None,
                   seed: int = 0) -> dict:
    """Write the Open-i manifest to `out`; returns the summary (with the counts of what was kept out)."""
    images = Path(images)
    if not images.is_dir():
        raise PrepareError(f"--images {images}: not a folder")
    found = _image_index(images)
    views = _projections(projections) if projections else {}
    r2gen: dict[str, tuple[str, str]] = {}
    if annotation:
        for split_key, e in iter_r2gen_annotation(annotation):
            m = re.match(r"^CXR(\d+)", str(e["id"]))
            if m:
                r2gen[m.group(1)] = (str(e["id"]), normalize_split(e.get("split") or split_key))
    left_out: Counter = Counter()
    records, seen, n_images_missing, unknown_views = [], set(), 0, 0
    view_source: Counter = Counter()
    for name, data in iter_report_xmls(reports):
        rep = parse_report_xml(data, name)
        uid = rep["uid"]
        if uid in seen:
            left_out["duplicate report id"] += 1
            continue
        seen.add(uid)
        if not rep["image_ids"]:
            left_out["no image listed"] += 1
            continue
        paths = []
        for iid in rep["image_ids"]:
            key = image_key(iid)
            p = found.get(key) if key else None
            if p is None:
                n_images_missing += 1
            else:
                paths.append((key, p))
        if not paths:
            left_out["no image file found"] += 1
            continue
        if not rep.get("findings"):
            left_out["no findings"] += 1
            continue
        if annotation and uid not in r2gen:
            left_out["not in the annotation"] += 1
            continue
        image_entries = []
        for key, p in paths:
            view = views.get(key)
            if view is not None:
                view_source["projections"] += 1
            elif p.lower().endswith((".dcm", ".dicom")):
                view = _dicom_view(p)
                if view is not None:
                    view_source["DICOM ViewPosition"] += 1
            if view is None:
                unknown_views += 1
            image_entries.append({"path": manifest_relative_path(p, out), "view": view})
        if annotation:
            rid, split = r2gen[uid]
        else:
            im_group = "-".join(paths[0][0].split("_", 1)[1].split("-")[:2])  # IM-0652 (R2Gen's id form)
            rid, split = f"CXR{uid}_{im_group}", seeded_split(uid, seed)
        rec = {"id": rid, "patient_id": uid, "split": split, "images": image_entries,
               "indication": rep.get("indication"), "history": None, "comparison": rep.get("comparison"),
               "findings": rep.get("findings"), "impression": rep.get("impression")}
        if rep.get("mesh"):
            rec["mesh"] = rep["mesh"]
        records.append(rec)
    notes: dict = {"reports_read": len(seen) + left_out["duplicate report id"]}
    for reason, n in sorted(left_out.items()):
        notes[f"left out ({reason})"] = n
    if n_images_missing:
        notes["listed images not found under --images"] = n_images_missing
    notes["views from"] = dict(view_source) or "none"
    if unknown_views:
        notes["views unknown"] = (f"{unknown_views} images (no --projections entry and no DICOM ViewPosition)")
    notes["split"] = "R2Gen annotation" if annotation else \
        f"seeded by patient (seed {seed}; train/val/test {'/'.join(str(int(r * 100)) for _, r in SPLIT_RATIOS)} %)"
    notes["priors"] = "none (Open-i has no study dates or links between studies: no study gets a prior)"
    return finish(records, out, "open-i", **notes)
