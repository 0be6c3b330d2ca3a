"""One image loader for training, generation and `data check`.

`load_image(path)` returns an 8-bit RGB PIL image for:

- PNG / JPEG / anything Pillow reads. 8-bit images are used as they are; images with more than 8 bits per
  sample (16-bit PNG, 32-bit TIFF) are scaled to 8 bits by their own min..max, because such files often hold
  10-, 12- or 14-bit data in a 16-bit container and a fixed divide-by-257 would make them near black.
- DICOM (by `.dcm`/`.dicom` suffix or the `DICM` marker, so extension-less hospital exports work) through
  pydicom, following the DICOM grayscale pipeline: stored values -> Modality LUT (Rescale Slope/Intercept or
  a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence if present, else the first Window Center/Width
  with its VOI LUT Function LINEAR / LINEAR_EXACT / SIGMOID, else the image's own min..max) -> MONOCHROME1
  inverted so that bone is bright -> 8 bits. Any bit depth works. Multi-frame files use the first frame.

Grayscale is replicated to three channels; the processor resizes and normalises.

`draft_size=(width, height)` lets Pillow decode a JPEG with DCT scaling (1/2, 1/4 or 1/8 of full size,
never smaller than the size asked for): a 2500x3000 radiograph headed for a 224 or 384 model input decodes
several times faster, and the resize that follows sees nearly the same pixels. Compressed DICOM transfer
syntaxes decode through pydicom's pixel plugins (the `dicom` extra: pylibjpeg, pylibjpeg-libjpeg,
pylibjpeg-openjpeg); a syntax with no installed plugin fails with an error that names the package to install.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from clinicalblip.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


class ImageLoadError(UserError):
    """An image that is missing or cannot be decoded; the message names the file and the problem."""


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM file by suffix, or by the 'DICM' marker after the 128-byte preamble."""
    name = str(path).lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.endswith(_PIL_SUFFIXES):  # no need to open the file to know (training calls this per image)
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def load_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Load a radiograph as an 8-bit RGB PIL image (grayscale replicated to three channels).

    draft_size: (width, height) the image will be resized to; JPEGs are then decoded at the smallest DCT
    scale that is still at least that large (other formats ignore it).
    """
    return load_image_gray_or_rgb(path, draft_size).convert("RGB")


def load_image_gray_or_rgb(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Like load_image, but grayscale images stay single-channel ("L"): the image cache stores one channel
    where three would be copies (resizing "L" or its RGB copy gives the same values per channel)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ImageLoadError(f"image path is a folder: {path}")
    try:
        if is_dicom(path):
            im = Image.fromarray(dicom_to_uint8(path, draft_size=draft_size))
            return im if im.mode in ("L", "RGB") else im.convert("RGB")
        with Image.open(path) as im:
            if draft_size and im.format == "JPEG" and im.mode in ("L", "RGB"):
                im.draft(im.mode, (int(draft_size[0]), int(draft_size[1])))
            im.load()
            return _pil_to_gray_or_rgb(im)
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL and pydicom raise many types for corrupt or unsupported files
        raise ImageLoadError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def load_image_bytes(data: bytes, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """`load_image` for bytes held in memory (uploads): nothing is written to disk.

    DICOM is recognised by the 'DICM' marker or a DICOM suffix on `name`. `name` is only used in error messages
    (callers that must not echo user file names pass a field name such as "images[0]"). With `max_pixels`,
    an image whose header declares more pixels is refused before its pixel data is decoded (decompression
    bombs: a few kB of PNG can declare gigabytes of pixels).
    """
    import io

    if not data:
        raise ImageLoadError(f"{name}: empty file")
    try:
        if (len(data) >= 132 and data[128:132] == b"DICM") or name.lower().endswith(DICOM_SUFFIXES):
            arr = dicom_to_uint8(io.BytesIO(data), name=name, max_pixels=max_pixels)
            return Image.fromarray(arr).convert("RGB")
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageLoadError(f"{name}: image is {w}x{h} = {w * h:,} pixels, above the limit of "
                                     f"{max_pixels:,} pixels")
            im.load()
            return _pil_to_gray_or_rgb(im).convert("RGB")
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard (at twice Image.MAX_IMAGE_PIXELS)
        raise ImageLoadError(f"{name}: image declares too many pixels, above the limit of "
                             f"{max_pixels or Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"cannot decode image {name}: not a PNG, JPEG, DICOM or other known image "
                             "format") from None
    except Exception as exc:  # PIL and pydicom raise many types for corrupt or unsupported files
        raise ImageLoadError(f"cannot decode image {name}: {type(exc).__name__}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def _pil_to_gray_or_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGB", "L"):
        return im.copy() if im.mode == "L" else im.convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_minmax_to_uint8(np.asarray(im)))
    if im.mode in ("LA", "La"):
        return im.getchannel(0)  # drop alpha: compositing on black would darken the edges
    return im.convert("RGB")


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return _unit_to_uint8((arr - lo) / (hi - lo))


def _unit_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(x) * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- DICOM
def dicom_to_uint8(path, draft_size: tuple[int, int] | None = None, name: str | None = None,
                   max_pixels: int | None = None) -> np.ndarray:
    """Pixel data of a DICOM file (a path or a binary file object) as uint8, (H, W) or (H, W, 3) for colour.

    draft_size: (width, height) the image is headed for; a JPEG 2000 image is then decoded at the coarsest
    wavelet resolution still at least that large (like JPEG draft mode: far less work, nearly the same
    pixels after the resize). `name` replaces the path in error messages; `max_pixels` refuses oversized
    images before decoding.
    """
    import pydicom

    label = name or str(path)
    ds = pydicom.dcmread(path, force=True)
    path = label  # error messages below name the file, never a file object
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(f"DICOM file has no pixel data: {path}")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    missing = missing_dicom_plugin(tsyntax)
    if missing:
        raise ImageLoadError(f"{path}: {missing}")
    if max_pixels is not None:
        n = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        if n > max_pixels:
            raise ImageLoadError(f"{path}: DICOM image has {n:,} pixels per frame, above the limit of "
                                 f"{max_pixels:,} pixels")
    try:
        arr = _j2k_reduced(ds, draft_size) if draft_size else None
        if arr is None:
            arr = ds.pixel_array
    except Exception as exc:
        name = getattr(tsyntax, "name", tsyntax)
        raise ImageLoadError(f"cannot decode DICOM pixel data in {path} (transfer syntax {name}): "
                             f"{type(exc).__name__}: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples > 1:
        # Colour (RGB, or YBR already converted to RGB by pydicom): no VOI pipeline, just scale to 8 bits.
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else _minmax_to_uint8(arr)
    if np.issubdtype(arr.dtype, np.integer) and int(arr.max()) - int(arr.min()) < (1 << 17):
        # Integer stored values: run the pipeline once per distinct value (a 12-bit image has at most 4096)
        # and look the pixels up, instead of a dozen float64 passes over ~8 million pixels. Same numbers.
        lo = int(arr.min())
        # unsigned: arr >= lo, so the subtraction stays in its dtype; signed: widen first (no wrap-around)
        offsets = arr - arr.dtype.type(lo) if arr.dtype.kind == "u" else arr.astype(np.int32) - lo
        domain = np.arange(lo, int(arr.max()) + 1).astype(arr.dtype)
        present = np.zeros(len(domain), dtype=bool)
        present[offsets] = True  # the min..max fallback must see only values that occur
        table = _pipeline(domain, ds, photometric, present)
        return table[offsets]
    return _pipeline(arr, ds, photometric)


_J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def _j2k_reduced(ds, draft_size: tuple[int, int]) -> np.ndarray | None:
    """Stored values of a single-frame, unsigned grayscale JPEG 2000 image at reduced resolution through
    Pillow's OpenJPEG (resolution levels dropped: 2x per level); None when this does not apply."""
    import io

    from pydicom.encaps import generate_frames

    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in _J2K_SYNTAXES or int(ds.get("NumberOfFrames", 1) or 1) != 1 \
            or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0) != 0 \
            or int(ds.get("BitsStored", 16) or 16) > 16:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    reduce = 0
    while (rows >> (reduce + 1)) >= draft_size[1] and (cols >> (reduce + 1)) >= draft_size[0] and reduce < 5:
        reduce += 1
    if reduce == 0:
        return None
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    # A raw codestream (SOC, SIZ) with one unsigned component; the SIZ segment holds its bit depth.
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 43 or frame[40:42] != b"\x00\x01" or frame[42] & 0x80:
        return None
    precision = (frame[42] & 0x7F) + 1
    im = Image.open(io.BytesIO(frame))
    im.reduce = reduce  # Pillow's JPEG 2000 plugin: resolution levels to discard
    im.load()
    arr = np.asarray(im)
    if im.mode.startswith("I;16") and precision < 16:
        arr = arr >> (16 - precision)  # Pillow scales samples up to 16 bits; the pipeline wants stored values
    elif im.mode != "L" and not im.mode.startswith("I;16"):
        return None
    return arr


def _pipeline(stored: np.ndarray, ds, photometric: str, present: np.ndarray | None = None) -> np.ndarray:
    """Modality LUT -> VOI -> MONOCHROME1 inversion -> uint8, elementwise over stored values."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(stored, ds).astype(np.float64)
    unit = _apply_voi(values, ds, present)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return _unit_to_uint8(unit)


def missing_dicom_plugin(tsyntax) -> str | None:
    """None when pydicom can decode this transfer syntax here; else a message naming the plugin to install.

    Cheap (no pixel data is read), so the record check can report it for every file before training.
    """
    if not tsyntax:
        return None
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(str(tsyntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} ({uid}) has no pixel-data decoder in pydicom"
    if decoder.is_available:
        return None
    # missing_dependencies reads like "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
    needs = "; ".join(decoder.missing_dependencies) or "a pixel-data plugin"
    return (f"compressed DICOM ({uid.name}, {uid}) needs a decoder plugin that is not installed: {needs}. "
            "Install one, e.g. pip install 'clinicalblip[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)")


def _first(value) -> float | None:
    """First value of a possibly multi-valued element (Window Center/Width may list several windows)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _apply_voi(values: np.ndarray, ds, present: np.ndarray | None = None) -> np.ndarray:
    """VOI transform of modality values to [0, 1] (`present`: which entries occur in the image, when
    `values` is a lookup domain rather than the pixels)."""
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and seq[0].get("LUTData") is not None:
        return _apply_lut(values, seq[0])
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        return window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    seen = values if present is None else values[present]
    lo, hi = float(seen.min()), float(seen.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _lut_table(item) -> np.ndarray:
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # LUT Data as OW: 16-bit little-endian words
        return np.frombuffer(bytes(data[: len(data) // 2 * 2]), dtype="<u2").astype(np.float64)
    return np.asarray(list(data) if not np.isscalar(data) else [data], dtype=np.float64)


def _apply_lut(values: np.ndarray, item) -> np.ndarray:
    """VOI LUT (PS3.3 C.11.2.1.1): values below the first mapped value take the first entry, above the
    last take the last. Output scaled by the table's own min..max, which is robust to descriptors that
    claim 16 bits for an 8-bit table (a known vendor quirk)."""
    n_entries, first = int(item.LUTDescriptor[0]), int(item.LUTDescriptor[1])
    table = _lut_table(item)
    n = len(table) if n_entries == 0 or n_entries > len(table) else n_entries
    if n == 0:
        return np.zeros_like(values)
    table = table[:n]
    idx = np.clip(np.rint(values) - first, 0, n - 1).astype(np.int64)
    lo, hi = float(table.min()), float(table.max())
    out = table[idx]
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM window (PS3.3 C.11.2.1.2/3) of modality values to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if width < 1:  # LINEAR requires width >= 1
        width = 1.0
    lo = center - 0.5 - (width - 1.0) / 2.0
    hi = center - 0.5 + (width - 1.0) / 2.0
    out = ((values - (center - 0.5)) / max(width - 1.0, 1e-12)) + 0.5
    out = np.where(values <= lo, 0.0, np.where(values > hi, 1.0, out))
    return np.clip(out, 0.0, 1.0)


def dicom_view_position(source) -> str | None:
    """The DICOM ViewPosition (0018,5101) of a file path or bytes, canonical as manifests write it (PA, AP,
    LATERAL...); None for a non-DICOM file or a DICOM without the tag. Reads the header only."""
    import io

    from clinicalblip.data.views import normalize_view

    if isinstance(source, (bytes, bytearray)):
        if not (len(source) >= 132 and source[128:132] == b"DICM"):
            return None
        fobj = io.BytesIO(source)
    else:
        if not is_dicom(source):
            return None
        fobj = source
    try:
        import pydicom

        ds = pydicom.dcmread(fobj, stop_before_pixels=True, force=True, specific_tags=["ViewPosition"])
        return normalize_view(str(ds.get("ViewPosition", "") or "")) or None
    except Exception:  # an unreadable header: the image loader names the problem when it decodes the file
        return None
