"""A preprocessed image cache: every image of a manifest decoded and resized once, read back in microseconds.

`clinicalblip data cache MANIFEST --out DIR --size N` writes

    DIR/cache.json      what the pixels are: size (height, width), resample filter, resize backend, format
    DIR/index.jsonl     one line per cached image: source path, its size / mtime_ns / hash prefix, and where
                        its pixels are (shard file, byte offset, channels)
    DIR/errors.jsonl    images that could not be read, with the reason (the build goes on without them)
    DIR/shards/*.bin    raw uint8 pixels, image after image: (height, width) for grayscale, (height, width, 3)
                        for colour. Grayscale is stored once: resizing a gray image or its RGB copy gives the
                        same values in every channel.
    DIR/manifest.jsonl  the manifest with absolute image paths; pointing `data.manifest` (or
                        `generate --manifest`) at it uses the cache without further settings

Pixels are what the model's BLIP image processor (Pillow backend) computes before rescaling: the decoded
8-bit image (DICOM through the VOI / MONOCHROME1 pipeline of images.py; JPEG with DCT-scaled draft decoding
and JPEG 2000 DICOM with wavelet levels dropped, both down to no less than the target size) resized to
(height, width) with Pillow's bicubic filter. Reading one back is a seek and a read; `PixelSource`
then applies the processor's rescale and normalisation, so cached pixel_values equal the raw path's.

The build is parallel (one process per worker, each writing its own shards) and resumable: the index is
appended after every finished chunk, a rerun skips every image whose source size and mtime are unchanged
(or whose mtime changed but whose hash prefix did not), and rebuilds the rest. Rebuilt images leave their
old pixels in old shards as dead bytes; building into a fresh folder compacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clinicalblip.data.images import ImageLoadError, load_image, load_image_gray_or_rgb
from clinicalblip.data.loader import available_cpus
from clinicalblip.data.manifest import read_manifest, write_manifest
from clinicalblip.errors import UserError

CACHE_FORMAT = 1
META = "cache.json"
INDEX = "index.jsonl"
ERRORS = "errors.jsonl"
HASH_PREFIX_BYTES = 1 << 16
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
_RESAMPLE_NAME = {int(v): k for k, v in _RESAMPLE.items()}


class CacheError(UserError):
    """An image cache folder that cannot be used as asked (other size, other format, not a cache)."""


def hash_prefix(path: str | os.PathLike) -> str:
    """blake2b of the first 64 KiB: tells a rewritten source from one whose mtime merely changed."""
    with open(path, "rb") as fh:
        return hashlib.blake2b(fh.read(HASH_PREFIX_BYTES), digest_size=8).hexdigest()


def resize_like_processor(im: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """uint8 pixels (H, W) or (H, W, 3) exactly as BLIP's Pillow-backend processor resizes them (it calls
    PIL's resize with reducing_gap=None on the 8-bit image)."""
    height, width = size
    out = im.resize((width, height), resample=_RESAMPLE[resample], reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def decode_for_cache(path: str, size: tuple[int, int], resample: str = "bicubic", jpeg_draft: bool = True) -> np.ndarray:
    """Decode and resize one image for the cache (raises ImageLoadError naming the file)."""
    im = load_image_gray_or_rgb(path, draft_size=(size[1], size[0]) if jpeg_draft else None)
    return resize_like_processor(im, size, resample)


# ---------------------------------------------------------------------------------------------- build
def _build_chunk(paths: list[str], size: tuple[int, int], resample: str, jpeg_draft: bool,
                 shard_dir: str) -> tuple[list[dict], list[dict]]:
    """Worker: decode a chunk into one new shard file. Returns (index entries, error entries)."""
    name = f"{uuid.uuid4().hex[:16]}.bin"
    tmp = os.path.join(shard_dir, f".{name}.tmp")
    entries, errors = [], []
    offset = 0
    with open(tmp, "wb") as out:
        for p in paths:
            st = None
            try:
                st = os.stat(p)
                digest = hash_prefix(p)
                arr = decode_for_cache(p, size, resample, jpeg_draft)
            except (ImageLoadError, OSError) as exc:
                reason = str(exc) if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
                errors.append({"src": p, "size": st.st_size if st else None,
                               "mtime_ns": st.st_mtime_ns if st else None, "reason": reason})
                continue
            out.write(arr.tobytes())
            channels = 1 if arr.ndim == 2 else arr.shape[2]
            entries.append({"src": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": digest,
                            "shard": name, "offset": offset, "channels": channels})
            offset += arr.nbytes
    if entries:
        os.replace(tmp, os.path.join(shard_dir, name))  # a shard exists only once it is complete
    else:
        os.unlink(tmp)
    return entries, errors


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that image is simply built again
    return out


def _drop_partial_tail(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline: cut it before appending after it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "rb+") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _check_meta(out: Path, meta: dict) -> None:
    path = out / META
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise CacheError(f"{out} exists and is not an image cache (no {META}); choose an empty or new folder")
        return
    old = json.loads(path.read_text())
    for key in ("format", "size", "resample", "jpeg_draft"):
        if old.get(key) != meta.get(key):
            raise CacheError(f"{out} holds a cache with {key}={old.get(key)!r}, not {meta.get(key)!r}: "
                             "build into another folder (--out)")


@dataclass
class CacheSummary:
    out: str
    images: int
    built: int
    reused: int
    failed: int
    seconds: float
    errors: list[dict]

    def format(self, max_errors: int = 5) -> str:
        rate = self.built / self.seconds if self.seconds > 0 else 0.0
        lines = [f"image cache {self.out}: {self.images} images, {self.built} built now ({rate:.1f} images/s), "
                 f"{self.reused} already cached, {self.failed} unreadable"]
        for e in self.errors[:max_errors]:
            lines.append(f"  unreadable {e['src']}: {e['reason']}")
        if self.failed > max_errors:
            lines.append(f"  ... (+{self.failed - max_errors} more in {Path(self.out) / ERRORS})")
        if self.images:
            lines.append(f"  train from it with data.image_cache={self.out} or data.manifest={Path(self.out) / 'manifest.jsonl'}")
        return "\n".join(lines)


def build_cache(manifest: str | os.PathLike, out: str | os.PathLike, size: int | tuple[int, int],
                workers: int | None = None, resample: str = "bicubic", jpeg_draft: bool = True,
                chunk: int = 64, progress: bool = True) -> CacheSummary:
    """Build (or bring up to date) the image cache of every image in a manifest; see the module docstring.

    size: the processor's input size, N (square) or (height, width). workers: decoding processes
    (default: the CPUs this process may use).
    """
    from clinicalblip.progress import progress as progress_bar

    if resample not in _RESAMPLE:
        raise CacheError(f"resample must be one of {', '.join(_RESAMPLE)}, not {resample!r}")
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(hw) < 1:
        raise CacheError(f"--size must be positive, got {size}")
    out = Path(out)
    meta = {"format": CACHE_FORMAT, "size": list(hw), "resample": resample, "backend": "pil",
            "jpeg_draft": bool(jpeg_draft), "manifest": str(Path(manifest).resolve())}
    _check_meta(out, meta)
    records = read_manifest(manifest)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / META).write_text(json.dumps(meta, indent=2))

    paths = list(dict.fromkeys(os.path.abspath(im["path"]) for r in records for im in r["images"] if im.get("path")))
    index = {e["src"]: e for e in _read_jsonl(out / INDEX) if (out / "shards" / e["shard"]).is_file()}
    failed_before = {e["src"]: e for e in _read_jsonl(out / ERRORS)}
    t0 = time.perf_counter()
    todo, reused, errors, refreshed = [], 0, [], []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            errors.append({"src": p, "size": None, "mtime_ns": None, "reason": f"image not found: {p}"})
            continue
        e = index.get(p)
        if e is not None and e["size"] == st.st_size:
            if e["mtime_ns"] == st.st_mtime_ns:
                reused += 1
                continue
            if e.get("hash") == hash_prefix(p):  # touched or copied, not rewritten
                refreshed.append(dict(e, mtime_ns=st.st_mtime_ns))
                reused += 1
                continue
        f = failed_before.get(p)
        if e is None and f is not None and f.get("size") == st.st_size and f.get("mtime_ns") == st.st_mtime_ns:
            errors.append(f)  # unchanged and unreadable last time: not decoded again
            continue
        todo.append(p)

    _drop_partial_tail(out / INDEX)
    n_workers = max(1, workers or available_cpus())
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    built = 0
    with open(out / INDEX, "a", encoding="utf-8") as index_fh:
        for e in refreshed:
            index_fh.write(json.dumps(e) + "\n")
        bar = progress_bar(total=len(todo), desc="cache", unit="img", disable=not progress or not todo)

        def record(result):
            nonlocal built
            entries, errs = result
            for e in entries:
                index_fh.write(json.dumps(e) + "\n")
            index_fh.flush()  # resumable: what is in the index is done
            errors.extend(errs)
            built += len(entries)
            bar.update(len(entries) + len(errs))

        if n_workers == 1 or len(chunks) <= 1:
            for c in chunks:
                record(_build_chunk(c, hw, resample, jpeg_draft, str(out / "shards")))
        else:
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                pending = set()
                it = iter(chunks)
                for c in it:  # bounded queue: results are written as they come, memory stays flat
                    pending.add(pool.submit(_build_chunk, c, hw, resample, jpeg_draft, str(out / "shards")))
                    if len(pending) >= 2 * n_workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            record(f.result())
                for f in pending:
                    record(f.result())
        bar.close()
    seconds = time.perf_counter() - t0
    with open(out / ERRORS, "w", encoding="utf-8") as fh:
        for e in errors:
            fh.write(json.dumps(e) + "\n")
    # The manifest copy: absolute image paths, so it works from the cache folder wherever the sources are.
    write_manifest(records, out / "manifest.jsonl")
    return CacheSummary(out=str(out), images=len(paths), built=built, reused=reused, failed=len(errors),
                        seconds=seconds, errors=errors)


# ---------------------------------------------------------------------------------------------- read
def find_image_cache(image_cache: str | None, manifest: str | os.PathLike | None = None) -> str | None:
    """The cache folder to read from: `image_cache` when given, else the manifest's own folder when the
    manifest is a cache's manifest copy; None for the raw path."""
    if image_cache:
        if not (Path(image_cache) / META).is_file():
            raise CacheError(f"data.image_cache={image_cache}: not an image cache (no {META}); "
                             "build one with `clinicalblip data cache MANIFEST --out DIR --size N`")
        return str(image_cache)
    if manifest and (Path(manifest).resolve().parent / META).is_file():
        return str(Path(manifest).resolve().parent)
    return None


class ImageCache:
    """Read side of a cache folder: `pixels(src)` -> uint8 (H, W) / (H, W, 3), or None when not cached."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise CacheError(f"{folder}: not an image cache (no {META})")
        self.meta = json.loads((self.folder / META).read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{folder}: cache format {self.meta.get('format')} (this version reads {CACHE_FORMAT})")
        self.size = tuple(self.meta["size"])
        # later lines win: a rebuilt image's newest pixels
        self.entries = {e["src"]: (e["shard"], e["offset"], e["channels"], e["size"], e["mtime_ns"])
                        for e in _read_jsonl(self.folder / INDEX)}
        self.errors = {e["src"]: e["reason"] for e in _read_jsonl(self.folder / ERRORS)}

    def __contains__(self, src: str) -> bool:
        return src in self.entries

    def pixels(self, src: str) -> np.ndarray | None:
        e = self.entries.get(src)
        if e is None:
            return None
        shard, offset, channels = e[:3]
        h, w = self.size
        n = h * w * channels
        with open(self.folder / "shards" / shard, "rb") as fh:
            fh.seek(offset)
            buf = fh.read(n)
        if len(buf) != n:
            raise CacheError(f"{self.folder}: shard {shard} is truncated (image {src}); rebuild the cache")
        arr = np.frombuffer(buf, dtype=np.uint8)
        return arr.reshape(h, w) if channels == 1 else arr.reshape(h, w, channels)

    def stale(self, src: str) -> bool:
        """True when the source exists and differs in size or mtime from what was cached."""
        e = self.entries.get(src)
        if e is None:
            return False
        try:
            st = os.stat(src)
        except OSError:
            return False  # the sources may stay behind when a cache is copied to a training node
        return (st.st_size, st.st_mtime_ns) != (e[3], e[4])

    def check_map(self) -> dict[str, str | None]:
        """{source path: None (cached, decoded fine) or the reason it is unreadable} for the record check."""
        out: dict[str, str | None] = {src: reason for src, reason in self.errors.items()}
        out.update(dict.fromkeys(self.entries))
        return out


# ---------------------------------------------------------------------------------------------- to tensors
class PixelSource:
    """Per-image pixel_values for StudyCollator (its `image_cache` hook: `.get(path)` and item assignment).

    Reads the disk cache when one is given; otherwise (or for an image the cache lacks) decodes the source,
    JPEGs in draft mode, and runs the processor. `memory=True` keeps every tensor once made (small data).
    """

    def __init__(self, image_processor, cache: str | os.PathLike | ImageCache | None = None,
                 jpeg_draft: bool = True, memory: bool = False):
        import torch

        self.ip = image_processor
        self.cache = ImageCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.jpeg_draft = jpeg_draft
        self.memory: dict | None = {} if memory else None
        size = getattr(image_processor, "size", None) or {}
        self.size = (int(size.get("height", 224)), int(size.get("width", 224)))
        self.misses = 0
        if self.cache is not None:
            self._check_compatible()
        scale = float(getattr(image_processor, "rescale_factor", 1 / 255)) if getattr(image_processor, "do_rescale", True) else 1.0
        if getattr(image_processor, "do_normalize", True):
            mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(-1, 1, 1)
            std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(-1, 1, 1)
        else:
            mean, std = torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64)
        # x * scale then (x - mean) / std, folded into one multiply-add per pixel
        self._mul = (scale / std).float()
        self._add = (-mean / std).float()

    def _check_compatible(self) -> None:
        ip, meta = self.ip, self.cache.meta
        if tuple(meta["size"]) != self.size:
            raise CacheError(f"image cache {self.cache.folder} holds {meta['size'][0]}x{meta['size'][1]} images but the "
                             f"model's processor resizes to {self.size[0]}x{self.size[1]}: rebuild with --size {self.size[0]}")
        res = _RESAMPLE_NAME.get(int(getattr(ip, "resample", 3) or 3))
        if res != meta["resample"]:
            raise CacheError(f"image cache {self.cache.folder} was resized with {meta['resample']}, the processor uses "
                             f"{res}: rebuild with --resample {res}")
        for flag in ("do_center_crop", "do_pad"):
            if getattr(ip, flag, False):
                raise CacheError(f"the model's image processor sets {flag}; the image cache supports resize + "
                                 "rescale + normalise only (read raw images instead: unset data.image_cache)")
        if not getattr(ip, "do_resize", True):
            raise CacheError("the model's image processor does not resize; the image cache needs a fixed size")

    def from_uint8(self, arr: np.ndarray):
        """(H, W) / (H, W, C) uint8 -> (3, H, W) float32 normalised as the processor would."""
        import torch

        # the shards are mapped read-only; .float() below copies anyway, so nothing ever writes to the map
        if not arr.flags.writeable:
            arr = np.array(arr)
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)  # grayscale: the processor's RGB conversion copies the channel
        return x.float() * self._mul + self._add

    def raw(self, path: str):
        """The raw path: decode (JPEG draft when enabled) and run the model's processor."""
        im = load_image(path, draft_size=(self.size[1], self.size[0]) if self.jpeg_draft else None)
        return self.ip([im], return_tensors="pt")["pixel_values"][0]

    def get(self, path: str, default=None):
        if self.memory is not None and path in self.memory:
            return self.memory[path]
        arr = self.cache.pixels(os.path.abspath(path)) if self.cache is not None else None
        if arr is not None:
            t = self.from_uint8(arr)
        else:
            if self.cache is not None:
                self.misses += 1
            t = self.raw(path)
        if self.memory is not None:
            self.memory[path] = t
        return t

    def __setitem__(self, path, value) -> None:
        if self.memory is not None:
            self.memory[path] = value


def pixel_source(image_processor, image_cache: str | None = None, manifest: str | os.PathLike | None = None,
                 jpeg_draft: bool = True, memory: bool = False) -> PixelSource:
    """The PixelSource a training or generation run reads images through (see find_image_cache)."""
    folder = find_image_cache(image_cache, manifest)
    return PixelSource(image_processor, cache=folder, jpeg_draft=jpeg_draft, memory=memory)
