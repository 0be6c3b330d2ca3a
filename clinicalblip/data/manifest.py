"""The manifest: JSON Lines, one study per line (schema in docs/DESIGN.md).

    {"id", "patient_id", "split", "images": [{"path", "view"}], "indication", "history",
     "comparison", "findings", "impression", ...extra keys preserved}

Image paths are relative to the manifest's folder (absolute paths are kept as they are).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Iterable, Iterator

from clinicalblip.errors import UserError
from clinicalblip.jsonl import iter_json_objects

SPLITS = ("train", "val", "test")
TEXT_FIELDS = ("indication", "history", "comparison", "findings", "impression")
CORE_FIELDS = ("id", "patient_id", "split", "images") + TEXT_FIELDS


class ManifestError(UserError):
    """A manifest line that cannot be read; the message names the file, line and record."""


def file_hash(path: str | os.PathLike) -> str:
    """A manifest's content hash (16 hex digits of its SHA-256): what stages and predictions record."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def normalize_record(rec: dict) -> dict:
    """Return a copy with every schema key present (missing text -> None) and extra keys kept."""
    out = {"id": rec.get("id"), "patient_id": rec.get("patient_id"), "split": rec.get("split")}
    images = rec.get("images") or []
    out["images"] = [
        {"path": im["path"], "view": im.get("view")} if isinstance(im, dict) else {"path": str(im), "view": None}
        for im in images
    ]
    for key in TEXT_FIELDS:
        value = rec.get(key)
        out[key] = value if (value is None or isinstance(value, str)) else str(value)
    for key, value in rec.items():
        if key not in out:
            out[key] = value
    return out


def iter_manifest(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, raw record) for each non-empty line; bad JSON raises ManifestError."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            yield from iter_json_objects(fh, path, ManifestError)
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_manifest(path: str | os.PathLike, split: str | None = None, resolve_paths: bool = True) -> list[dict]:
    """Read a manifest; optionally keep one split; image paths resolved against the manifest folder."""
    path = Path(path)
    root = path.resolve().parent
    records = []
    for lineno, raw in iter_manifest(path):
        if "id" not in raw:
            raise ManifestError(f"{path}:{lineno}: record has no 'id'")
        records.append(normalize_record(raw))
    if any("prior_id" in r or "prior" in r for r in records):
        from clinicalblip.data.priors import link_priors  # the one place that links priors (all splits)

        link_priors(records)
    if split is not None:
        records = [r for r in records if r["split"] == split]
    if resolve_paths:
        for rec in records:
            prior = rec.get("prior")
            prior_images = prior.get("images") or [] if isinstance(prior, dict) else []
            for im in rec["images"] + [im for im in prior_images if isinstance(im, dict) and im.get("path")]:
                im["path"] = resolve_image_path(root, im["path"])
    return records


def resolve_image_path(root: Path, p: str) -> str:
    # Plain relative paths (nearly all) are joined as strings: pathlib costs ~40 us a path, which adds up
    # to seconds on a MIMIC-size manifest. Anything pathlib would rewrite ("./", "//", trailing "/") goes to it.
    if p and p != "." and not p.startswith(("/", "./")) and "//" not in p and "/./" not in p and not p.endswith(("/", "/.")) \
            and os.sep == "/":
        return f"{root}/{p}" if str(root) != "/" else f"/{p}"
    q = Path(p)
    return str(q if q.is_absolute() else root / q)


def write_manifest(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write records as JSON Lines (atomically: written aside, then renamed). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(normalize_record(rec), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


_SPLIT_ALIASES = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validate": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "tst": "test",
}


def normalize_split(value) -> str | None:
    """Canonical split name: "validate" / "validation" / "dev" -> "val" and so on; unknown names kept
    (lower case) so that `data check` can point at them; blank -> None."""
    if value is None:
        return None
    s = str(value).strip().lower()
    if not s or s in ("nan", "none", "null"):
        return None
    return _SPLIT_ALIASES.get(s, s)


def manifest_relative_path(image_path: str | os.PathLike, manifest_path: str | os.PathLike) -> str:
    """An image path as the manifest stores it: relative to the manifest's folder (POSIX separators), or
    absolute when the two share no root (another drive)."""
    image_path = os.path.abspath(image_path)
    root = os.path.dirname(os.path.abspath(manifest_path))
    try:
        rel = os.path.relpath(image_path, root)
    except ValueError:  # different drives on Windows
        return image_path
    return Path(rel).as_posix()


def manifest_path_prefix(folder: str | os.PathLike, manifest_path: str | os.PathLike) -> str:
    """`folder` as seen from the manifest's folder; join file names under it with `join_manifest_path`.
    (Computing the relative path once per dataset instead of once per image keeps prepare fast.)"""
    return manifest_relative_path(folder, manifest_path)


def join_manifest_path(prefix: str, relative: str) -> str:
    """prefix + a POSIX path relative to it, normalised ("a/./b" -> "a/b")."""
    return posixpath.normpath(posixpath.join(prefix, str(relative).replace(os.sep, "/")))
