"""Validate manifest records: what `data check` prints, and the `on_bad_record: error | skip` policy.

Problems that make a record unusable (errors):

    bad_json          a line that is not a JSON object (reported as "line N")
    not_utf8          a line that is not valid UTF-8
    missing_id        no id
    duplicate_id      the id occurs more than once (every copy is flagged: which one is right is unknown)
    patient_in_two_splits  the patient has studies in more than one of train/val/test (every study of that
                      patient is flagged: keeping any of them would leak the patient across splits)
    no_images         no image listed
    missing_image     an image file does not exist
    unreadable_image  an image file is empty, its header is not an image's (PNG/JPEG signature and size,
                      DICOM header with pixel data of the right length and a decoder for its transfer
                      syntax), or, with check_images=decode, it does not decode (the loader training uses)
    empty_report      split train/val/test and neither findings nor impression has text
    empty_target      split train/val/test and the section the template writes (`target`: findings,
                      impression or findings_impression) has no text (checked when a target is given:
                      train, generate, `data check --template`)
    encoding          text with U+FFFD replacement characters, mojibake ("Ã©", "â€™") or control bytes
    prior_missing, prior_other_patient, prior_later, prior_other_split, prior_cycle, prior_bad
                      a broken link to the prior study (`prior_id` naming no record, another patient's or
                      another split's study, a later one, a chain that comes back; an unusable embedded
                      `prior`): see clinicalblip.data.priors

Warnings (reported, exit status unaffected): no_patient_id (the leakage check cannot see the record),
no_view (no image has a view label), unknown_split (a split outside train/val/test, e.g. "dev"), no_split
(no split at all: train, val and test all leave the record out; `data prepare csv|jsonl --split-by patient_id`
assigns one), no_findings / no_impression (without a target: a train/val/test record whose findings or
impression is empty, so a template writing that section cannot use it).

Image checks (`check_images`): "header" (default: existence, size and header, read cheaply: a DICOM header
without its pixels), "decode" (every image fully decoded: `data check --decode`; the image cache build
decodes anyway), "exists", "none". With an image cache, images the cache holds count as checked (they were
decoded when it was built) and those it could not read are unreadable with the build's reason.

Call `apply_bad_record_policy` on the whole manifest (not one split): the patient check needs every split.
Given the manifest path, it checks on one rank, shares the result with the others, and keeps it on disk
keyed by the manifest's hash and every image's size and mtime, so the next stage on the same data skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clinicalblip.data.images import ImageLoadError, load_image
from clinicalblip.data.priors import PRIOR_ERRORS, prior_problems
from clinicalblip.data.manifest import SPLITS, TEXT_FIELDS, normalize_record, resolve_image_path
from clinicalblip.data.text import encoding_problem
from clinicalblip.errors import UserError

ERRORS = ("bad_json", "not_utf8", "missing_id", "duplicate_id", "patient_in_two_splits", "no_images",
          "missing_image", "unreadable_image", "empty_report", "empty_target", "encoding") + PRIOR_ERRORS
WARNINGS = ("no_patient_id", "no_view", "unknown_split", "no_split", "no_findings", "no_impression")
IMAGE_CHECKS = ("header", "decode", "exists", "none")
CHECK_VERSION = 2  # bump when a check changes: stored results of older checks are then not reused


class BadRecordsError(UserError):
    """Unusable records with on_bad_record=error; the message names them and their problems."""


@dataclass
class Problem:
    code: str
    detail: str = ""

    @property
    def is_error(self) -> bool:
        return self.code in ERRORS

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


@dataclass
class CheckReport:
    """Per-record problems of a manifest; `problems[i]` belongs to `keys[i]` (the id or "line N")."""

    keys: list[str]
    problems: list[list[Problem]]
    manifest: str | None = None
    counts: Counter = field(default_factory=Counter)

    @property
    def n_records(self) -> int:
        return len(self.keys)

    def bad_indices(self) -> list[int]:
        return [i for i, ps in enumerate(self.problems) if any(p.is_error for p in ps)]

    def bad(self) -> dict[str, list[str]]:
        """{id: ["code: detail", ...]} of the unusable records (errors only)."""
        out: dict[str, list[str]] = {}
        for i in self.bad_indices():
            out.setdefault(self.keys[i], []).extend(str(p) for p in self.problems[i] if p.is_error)
        return out

    @property
    def ok(self) -> bool:
        return not self.bad_indices()

    def ids_by_code(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for key, ps in zip(self.keys, self.problems):
            for code in dict.fromkeys(p.code for p in ps):
                out[code].append(key)
        return out

    def format(self, max_ids: int = 5) -> str:
        """The summary `data check` prints: one line per problem with its count and first ids."""
        n_bad = len(self.bad_indices())
        n_warn = sum(1 for ps in self.problems if ps and not any(p.is_error for p in ps))
        where = f" in {self.manifest}" if self.manifest else ""
        lines = [f"checked {self.n_records} records{where}: {self.n_records - n_bad} usable, {n_bad} unusable"
                 + (f", {n_warn} with warnings only" if n_warn else "")]
        by_code = self.ids_by_code()
        first_detail = {}
        for ps in self.problems:
            for p in ps:
                first_detail.setdefault(p.code, p.detail)
        for code in ERRORS + WARNINGS:
            ids = by_code.get(code)
            if not ids:
                continue
            kind = "error  " if code in ERRORS else "warning"
            shown = ", ".join(dict.fromkeys(ids[:max_ids]))
            more = f" (+{len(ids) - max_ids} more)" if len(ids) > max_ids else ""
            detail = f"  [{first_detail[code]}]" if first_detail.get(code) else ""
            lines.append(f"  {kind} {code:<22} {len(ids):>7}  {shown}{more}{detail}")
        n_nosplit = len(set(by_code.get("no_split", [])))
        if n_nosplit and n_nosplit == self.n_records:
            lines.append(f"  no record has a split: `train` would find no train records (re-run data prepare with "
                         "--split-by patient_id --ratios 0.7,0.1,0.2, or --split)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        by_code = self.ids_by_code()
        return {"manifest": self.manifest, "records": self.n_records, "unusable": len(self.bad_indices()),
                "problems": {c: {"count": len(ids), "ids": ids[:100]} for c, ids in by_code.items()}}


# ---------------------------------------------------------------------------------------------- checks
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def _jpeg_header(head: bytes, whole_file: bool) -> str | None:
    """None when the JPEG markers reach a frame header with a non-zero size, else the problem."""
    if head[:2] != b"\xff\xd8":
        return "not a JPEG (no SOI marker)"
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return f"corrupt JPEG marker at byte {i}"
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", head[i + 2:i + 4])[0]
        if marker in _SOF:
            if i + 9 > len(head):
                return None  # frame header beyond what was read: leave it to the decoder
            h, w = struct.unpack(">HH", head[i + 5:i + 9])
            return None if h and w else f"JPEG frame of size {w}x{h}"
        if marker in (0xD9, 0xDA):
            return "JPEG without a frame header"
        i += 2 + length
    if whole_file:
        return "JPEG without a frame header (the file ends first)"
    return None  # very large metadata segments: the header looked fine as far as it was read


def _dicom_header(path: str, size: int) -> str | None:
    import pydicom

    from clinicalblip.data.images import missing_dicom_plugin

    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
        except Exception as exc:  # pydicom raises many types for a corrupt header
            return f"unreadable DICOM header: {type(exc).__name__}: {exc}"
        pos = fh.tell()
        tag = fh.read(4)
    if tag not in _PIXEL_TAGS:
        return "DICOM file has no pixel data"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not cols:
        return f"DICOM image of size {cols}x{rows}"
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    missing = missing_dicom_plugin(tsyntax)
    if missing:
        return missing
    if tsyntax is None or not tsyntax.is_compressed:
        need = rows * cols * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.get("NumberOfFrames", 1) or 1) \
            * max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
        if size - pos - 12 < need:
            return f"DICOM pixel data truncated: {size - pos} bytes left for {need} bytes of pixels"
    return None


def header_problem(path: str) -> str | None:
    """The cheap image check: None when the file looks like a decodable image, else the problem.
    Reads the first 64 KiB at most (a DICOM header without its pixels)."""
    from clinicalblip.data.images import is_dicom

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if size == 0:
        return f"empty file: {path}"
    try:
        if is_dicom(path):
            why = _dicom_header(path, size)
        else:
            with open(path, "rb") as fh:
                head = fh.read(1 << 16)
            if head.startswith(_PNG_SIG):
                ok = len(head) >= 24 and head[12:16] == b"IHDR" and min(struct.unpack(">II", head[16:24])) > 0
                why = None if ok else "corrupt PNG header"
            elif head[:2] == b"\xff\xd8":
                why = _jpeg_header(head, whole_file=len(head) < (1 << 16))
            else:
                from PIL import Image

                try:
                    with Image.open(path) as im:  # lazy: parses the header only
                        why = None if im.size[0] and im.size[1] else f"image of size {im.size}"
                except Exception as exc:
                    why = f"not an image Pillow reads: {type(exc).__name__}: {exc}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    return f"{path}: {why}" if why else None


def _image_problem(path: str, mode: str, cached: dict | None = None) -> Problem | None:
    if cached is not None and path in cached:  # decoded when the image cache was built
        reason = cached[path]
        return None if reason is None else Problem("unreadable_image", reason)
    if not os.path.isfile(path):
        return Problem("missing_image", os.path.normpath(path))
    if mode == "header":
        why = header_problem(path)
        return Problem("unreadable_image", why) if why else None
    if mode == "decode":
        try:
            load_image(path)
        except ImageLoadError as exc:
            return Problem("unreadable_image", str(exc))
    return None


def _has_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _target_problems(r: dict, split: str, target: str | None) -> list[Problem]:
    """The one rule for records without a target, for every split that is trained, validated or tested."""
    has = {k: _has_text(r.get(k)) for k in ("findings", "impression")}
    if not any(has.values()):
        return [Problem("empty_report", f"split {split}: no findings or impression")]
    if target is not None:
        if target in has and not has[target]:
            return [Problem("empty_target", f"split {split}: no {target} (the template's target)")]
        return []
    return [Problem(f"no_{k}", f"split {split}: {k} empty") for k in ("findings", "impression") if not has[k]]


def check_records(records: list[dict], check_images: str | bool = "header", root: str | os.PathLike | None = None,
                  jobs: int | None = None, _pre: list[list[Problem]] | None = None,
                  _keys: list[str] | None = None, cached: dict | None = None,
                  target: str | None = None) -> CheckReport:
    """Check records (as read_manifest returns them, image paths resolved; or pass `root` to resolve
    relative paths). `check_images`: "header" (default), "decode" (True), "exists", or "none" (False).
    cached: {path: None or reason} of images an image cache already decoded (ImageCache.check_map).
    target: the section a template writes (findings | impression | findings_impression): a train/val/test
    record without it is unusable (empty_target); None reports empty sections per section as warnings."""
    mode = {True: "decode", False: "none", None: "none"}.get(check_images, check_images)
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, not {check_images!r}")
    root_path = Path(root).resolve() if root is not None else None
    n = len(records)
    problems: list[list[Problem]] = [list(p) for p in _pre] if _pre is not None else [[] for _ in range(n)]
    keys = list(_keys) if _keys is not None else [None] * n  # type: ignore[list-item]

    id_count = Counter(r.get("id") for r in records if r is not None and r.get("id") not in (None, ""))
    patient_splits: dict[str, set] = defaultdict(set)
    for r in records:
        if r is not None and r.get("patient_id") not in (None, "") and r.get("split") in SPLITS:
            patient_splits[str(r["patient_id"])].add(r["split"])

    links = prior_problems(records) if any(r is not None and ("prior_id" in r or "prior" in r)
                                           for r in records) else None
    image_jobs: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r is None:  # a line that did not parse: its problem is already in _pre
            continue
        rid = r.get("id")
        if keys[i] is None:
            keys[i] = str(rid) if rid not in (None, "") else f"record {i + 1}"
        ps = problems[i]
        if rid in (None, ""):
            ps.append(Problem("missing_id"))
        elif id_count[rid] > 1:
            ps.append(Problem("duplicate_id", f"{id_count[rid]} records share id {rid!r}"))
        pid = r.get("patient_id")
        split = r.get("split")
        if pid in (None, ""):
            ps.append(Problem("no_patient_id"))
        elif len(patient_splits.get(str(pid), ())) > 1:
            ps.append(Problem("patient_in_two_splits",
                              f"patient {pid} in {'/'.join(s for s in SPLITS if s in patient_splits[str(pid)])}"))
        if split is not None and split not in SPLITS:
            ps.append(Problem("unknown_split", repr(split)))
        elif split is None:
            ps.append(Problem("no_split", "no split: train/val/test leave it out; set one, e.g. data prepare "
                                          "--split-by patient_id"))
        images = r.get("images") or []
        if not images:
            ps.append(Problem("no_images"))
        elif not any(isinstance(im, dict) and im.get("view") for im in images):
            ps.append(Problem("no_view"))
        if split in SPLITS:
            ps.extend(_target_problems(r, split, target))
        for k in TEXT_FIELDS:
            v = r.get(k)
            bad = encoding_problem(v) if isinstance(v, str) else None
            if bad:
                ps.append(Problem("encoding", f"{k} {bad}"))
                break
        if links is not None:
            ps += [Problem(code, detail) for code, detail in links[i]]
            emb = r.get("prior") if r.get("prior_id") in (None, "") else None
            if isinstance(emb, dict) and isinstance(emb.get("images"), list):  # an embedded prior's own images
                images = list(images) + [im for im in emb["images"] if isinstance(im, dict)]
        if mode != "none":
            for im in images:
                p = im.get("path") if isinstance(im, dict) else im
                if not p:
                    ps.append(Problem("missing_image", "image entry without a path"))
                    continue
                p = str(p)
                if root_path is not None:
                    p = resolve_image_path(root_path, p)
                image_jobs[p].append(i)

    if image_jobs:
        paths = list(image_jobs)
        workers = jobs or min(8, (os.cpu_count() or 2))
        # Decoding is mostly C code that releases the GIL: threads give a real speed-up without pickling.
        # Paths go to the threads in chunks: one future per image costs more than a header check.
        step = 512
        chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = [r for part in pool.map(lambda ps: [_image_problem(p, mode, cached) for p in ps], chunks)
                       for r in part]
        for p, prob in zip(paths, results):
            if prob is not None:
                for i in image_jobs[p]:
                    problems[i].append(prob)

    counts = Counter(code for ps in problems for code in {p.code for p in ps})
    return CheckReport(keys=keys, problems=problems, counts=counts)


def read_manifest_tolerant(path: str | os.PathLike) -> tuple[list[dict | None], list[list[Problem]], list[str | None]]:
    """Every line of a manifest, bad ones included: (records or None, problems so far, keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    root = path.resolve().parent
    records: list[dict | None] = []
    problems: list[list[Problem]] = []
    keys: list[str | None] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            ps: list[Problem] = []
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw.decode("utf-8", errors="replace")
                ps.append(Problem("not_utf8", f"line {lineno}: {exc.reason} at byte {exc.start}"))
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rec = None
                ps.append(Problem("bad_json", f"line {lineno}: {exc.msg}"))
            if rec is not None and not isinstance(rec, dict):
                ps.append(Problem("bad_json", f"line {lineno}: a JSON {type(rec).__name__}, not an object"))
                rec = None
            key = None
            if rec is not None:
                rec = _safe_normalize(rec, root, ps)
            else:
                key = f"line {lineno}"
            if rec is not None and not rec.get("id"):
                key = f"line {lineno}"
            records.append(rec)
            problems.append(ps)
            keys.append(key)
    return records, problems, keys


def _safe_normalize(rec: dict, root: Path, ps: list[Problem]) -> dict:
    """normalize_record for possibly malformed input: odd `images` values become problems, not crashes."""
    images = rec.get("images")
    if isinstance(images, str):
        images = [images]
    elif images is not None and not isinstance(images, list):
        ps.append(Problem("no_images", f"'images' is a {type(images).__name__}, not a list"))
        images = []
    fixed = []
    for im in images or []:
        p = im.get("path") if isinstance(im, dict) else im
        view = im.get("view") if isinstance(im, dict) else None
        fixed.append({"path": resolve_image_path(root, str(p)) if p else None, "view": view})
    out = normalize_record({**rec, "images": []})
    out["images"] = fixed
    emb = out.get("prior")
    if isinstance(emb, dict) and isinstance(emb.get("images"), list):  # an embedded prior's images, resolved too
        out["prior"] = {**emb, "images": [
            {**im, "path": resolve_image_path(root, str(im["path"]))} if isinstance(im, dict) and im.get("path")
            else im for im in emb["images"]]}
    return out


def check_manifest(path: str | os.PathLike, check_images: str | bool = "header", jobs: int | None = None,
                   image_cache: str | os.PathLike | None = None, target: str | None = None) -> CheckReport:
    """Check every line of a manifest file (unreadable lines included) -> CheckReport. A cache's manifest
    copy is checked against its cache (see the module docstring) without naming the cache."""
    if image_cache is None:
        from clinicalblip.data.cache import find_image_cache

        image_cache = find_image_cache(None, path)
    records, pre, keys = read_manifest_tolerant(path)
    report = check_records(records, check_images=check_images, jobs=jobs, _pre=pre, _keys=keys,
                           cached=_cache_map(image_cache), target=target)
    report.manifest = str(path)
    return report


# ---------------------------------------------------------------------------------------------- policy
def find_bad_records(records: list[dict], check_images: str | bool = "header",
                     root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{id: ["code: detail", ...]} for every unusable record (see the module docstring for the codes)."""
    return check_records(records, check_images=check_images, root=root).bad()


def _cache_map(image_cache) -> dict | None:
    if not image_cache:
        return None
    from clinicalblip.data.cache import ImageCache

    return ImageCache(image_cache).check_map()


def check_cache_dir() -> Path:
    """Where stored check results live: $CLINICALBLIP_CACHE/checks (default ~/.cache/clinicalblip/checks)."""
    base = os.environ.get("CLINICALBLIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clinicalblip")
    return Path(base) / "checks"


def _image_stats_digest(records: list[dict]) -> str:
    """Every image's path, size and mtime: a stored result is reused only if no file changed."""
    h = hashlib.blake2b(digest_size=16)
    for p in dict.fromkeys(str(im.get("path")) for r in records for im in (r.get("images") or [])
                           if isinstance(im, dict)):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0-\n".encode())
    return h.hexdigest()


def _check_key(manifest: str | os.PathLike, mode: str, image_cache, n: int, target: str | None = None) -> str:
    h = hashlib.sha256()
    with open(manifest, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"\0{mode}\0{CHECK_VERSION}\0{n}\0{target}".encode())
    if image_cache:
        for name in ("index.jsonl", "errors.jsonl"):
            p = Path(image_cache) / name
            st = p.stat() if p.is_file() else None
            h.update(f"\0{Path(image_cache).resolve()}/{name}:{st and st.st_size}:{st and st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def bad_record_list(records: list[dict], check_images: str | bool = "header", root: str | os.PathLike | None = None,
                    manifest: str | os.PathLike | None = None, image_cache: str | os.PathLike | None = None,
                    log: Callable[[str], None] | None = None,
                    target: str | None = None) -> list[tuple[int, str, list[str]]]:
    """[(index, key, error codes)] of the unusable records; reuses a stored result when `manifest` is given
    and neither it nor any image changed since."""
    mode = {True: "decode", False: "none", None: "none"}.get(check_images, check_images)
    store = None
    if manifest is not None and os.path.isfile(manifest):
        store = check_cache_dir() / f"{_check_key(manifest, str(mode), image_cache, len(records), target)}.json"
        digest = _image_stats_digest(records) if mode != "none" else ""
        try:
            saved = json.loads(store.read_text())
            if saved.get("stats") == digest:
                if log:
                    log(f"record check: reusing the result stored for this manifest and these files ({store})")
                return [(int(i), k, list(c)) for i, k, c in saved["bad"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    report = check_records(records, check_images=mode, root=root, cached=_cache_map(image_cache), target=target)
    bad = [(i, report.keys[i], list(dict.fromkeys(p.code for p in report.problems[i] if p.is_error)))
           for i in report.bad_indices()]
    if store is not None:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"manifest": str(manifest), "mode": mode, "stats": digest, "bad": bad}))
            os.replace(tmp, store)
        except OSError:
            pass  # a read-only home: the check simply runs again next time
    return bad


def apply_bad_record_policy(records: list[dict], policy: str = "error", log: Callable[[str], None] = print,
                            check_images: str | bool = "header", root: str | os.PathLike | None = None,
                            max_ids: int = 50, manifest: str | os.PathLike | None = None,
                            image_cache: str | os.PathLike | None = None, share: bool = True,
                            target: str | None = None, what: str = "records",
                            skip_hint: str = "data.on_bad_record=skip") -> list[dict]:
    """The records to use under `on_bad_record`.

    "error": any unusable record raises BadRecordsError naming the records and their problems.
    "skip": unusable records are dropped; `log` gets one line with the count and their ids (nothing vanishes
    silently). Returns the remaining records in their original order.
    manifest: the file the records came from; its check result is stored and reused (see bad_record_list).
    share: under torch.distributed, rank 0 checks and the other ranks receive its result.
    target: the template's target section (records without it are unusable: empty_target).
    what: how the records are named in the messages (e.g. "records of split 'test'").
    skip_hint: how the caller's user skips them (the train override by default), quoted in the error.
    """
    if policy not in ("error", "skip"):
        raise UserError(f"on_bad_record must be 'error' or 'skip', not {policy!r}")

    def run():
        return bad_record_list(records, check_images, root=root, manifest=manifest, image_cache=image_cache, log=log,
                               target=target)

    if share:
        from clinicalblip.data.loader import run_on_rank0

        bad = run_on_rank0(run)
    else:
        bad = run()
    if not bad:
        return list(records)
    described = [f"{key} ({', '.join(codes)})" for _, key, codes in bad]
    more = f" ... (+{len(bad) - max_ids} more; run `clinicalblip data check` for all)" if len(bad) > max_ids else ""
    listing = "; ".join(described[:max_ids]) + more
    if policy == "error":
        raise BadRecordsError(f"{len(bad)} of {len(records)} {what} are unusable: {listing}. Fix them "
                              f"(`clinicalblip data check MANIFEST` lists every problem) or skip them with {skip_hint}")
    log(f"on_bad_record=skip: dropping {len(bad)} of {len(records)} {what}: {listing}")
    drop = {i for i, _, _ in bad}
    return [r for i, r in enumerate(records) if i not in drop]
