"""Compressed DICOM through pydicom's pixel plugins (the `dicom` extra), with files written here in each
transfer syntax: lossless ones decode to exactly the uncompressed file's pixels; a syntax whose plugin is
missing fails with an error that names the plugin to install."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinicalblip.data.check import header_problem
from clinicalblip.data.images import ImageLoadError, dicom_to_uint8, load_image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
    RLELossless, generate_uid,
)

ROWS, COLS = 48, 64


def _pixels(bits: int = 12) -> np.ndarray:
    y, x = np.mgrid[0:ROWS, 0:COLS]
    arr = (x * 37 + y * 53 + (x * y) % 97) % (1 << bits)
    return arr.astype(np.uint16 if bits > 8 else np.uint8)


def _dataset(arr: np.ndarray, syntax=ExplicitVRLittleEndian, stored: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 8 if arr.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.PixelData = arr.tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_lossless_sv1(arr: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG Lossless (Process 14, selection value 1) encoder: one component, predictor Ra, one
    Huffman table giving every difference category a 5-bit code (valid, if not compact)."""
    bits: list[str] = []
    half = 1 << (precision - 1)
    a = arr.astype(np.int64)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            if r == 0 and c == 0:
                pred = half
            elif r == 0:
                pred = a[r, c - 1]
            elif c == 0:
                pred = a[r - 1, c]
            else:
                pred = a[r, c - 1]
            d = int(a[r, c] - pred)
            d = ((d + 32768) % 65536) - 32768
            ssss = 0 if d == 0 else abs(d).bit_length()
            bits.append(format(ssss, "05b"))
            if 0 < ssss < 16:
                v = d if d > 0 else d - 1
                bits.append(format(v & ((1 << ssss) - 1), f"0{ssss}b"))
    s = "".join(bits)
    s += "1" * (-len(s) % 8)
    data = bytearray()
    for i in range(0, len(s), 8):
        byte = int(s[i:i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing
    h, w = arr.shape
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + bytes([1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5 (categories 0..16)
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 1 + 16 + 17) + b"\x00" + bytes(counts) + bytes(range(17))
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x00]) + bytes([1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + bytes(data) + b"\xff\xd9"


def _encapsulated(ds: Dataset, frame: bytes, syntax) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dcm")
    arr = _pixels()
    path = _save(_dataset(arr), folder / "native.dcm")
    return folder, arr, dicom_to_uint8(path)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_lossless_syntaxes_written_by_pydicom_decode_exactly(reference, syntax):
    folder, arr, expected = reference
    ds = _dataset(arr)
    ds.compress(syntax, arr)
    path = _save(ds, folder / f"{syntax}.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert header_problem(str(path)) is None
    np.testing.assert_array_equal(dicom_to_uint8(path), expected)
    assert load_image(path).size == (COLS, ROWS)


def test_jpeg_lossless_process14_decodes_exactly(reference):
    folder, arr, expected = reference
    ds = _encapsulated(_dataset(arr), jpeg_lossless_sv1(arr, 12), JPEGLosslessSV1)
    path = _save(ds, folder / "jpeg_ll.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, arr)
    np.testing.assert_array_equal(dicom_to_uint8(path), expected)


def test_jpeg_baseline_and_jpeg2000_lossy_decode_close(reference, tmp_path):
    import io

    from PIL import Image

    y, x = np.mgrid[0:ROWS, 0:COLS]
    arr8 = (x * 3 + y * 2).astype(np.uint8)  # smooth, as radiographs are: JPEG keeps it close
    buf = io.BytesIO()
    Image.fromarray(arr8).save(buf, format="JPEG", quality=95)

    def plain8():
        ds = _dataset(arr8, stored=8)
        del ds.WindowCenter, ds.WindowWidth
        return ds

    path = _save(_encapsulated(plain8(), buf.getvalue(), JPEGBaseline8Bit), tmp_path / "baseline.dcm")
    got = dicom_to_uint8(path).astype(int)
    ref = dicom_to_uint8(_save(plain8(), tmp_path / "native8.dcm")).astype(int)
    assert np.abs(got - ref).mean() < 2

    folder, arr, expected = reference
    ds = _dataset(arr)
    ds.compress(JPEG2000, arr, j2k_cr=[5])
    path = _save(ds, folder / "j2k_lossy.dcm")
    assert np.abs(dicom_to_uint8(path).astype(int) - expected.astype(int)).mean() < 4


def test_jpeg_extended_12bit_from_pydicoms_test_files():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPGExtended.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's bundled JPGExtended.dcm is not present")
    out = dicom_to_uint8(path)
    assert out.dtype == np.uint8 and out.shape == (pydicom.dcmread(path).Rows, pydicom.dcmread(path).Columns)
    assert out.max() > out.min()


def test_missing_plugin_is_named_for_its_transfer_syntax(reference):
    folder, arr, _ = reference
    ds = _encapsulated(_dataset(arr), jpeg_lossless_sv1(arr, 12), JPEGLosslessSV1)
    path = _save(ds, folder / "jpeg_ll_noplugin.dcm")
    # a Python where pylibjpeg (with libjpeg, the only decoder of this syntax here) is not installed
    code = ("import sys; sys.modules['pylibjpeg'] = None; sys.modules['gdcm'] = None\n"
            "from clinicalblip.data.images import load_image, ImageLoadError\n"
            "from clinicalblip.data.check import header_problem\n"
            f"print('HEADER', header_problem({str(path)!r}))\n"
            f"try:\n    load_image({str(path)!r})\nexcept ImageLoadError as e:\n    print('ERROR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("HEADER", "ERROR"):
        msg = next(l for l in proc.stdout.splitlines() if l.startswith(line))
        assert "JPEG Lossless" in msg and "pylibjpeg-libjpeg" in msg and "clinicalblip[dicom]" in msg, msg


def test_header_check_catches_truncated_and_pixel_less_dicom(reference, tmp_path):
    folder, arr, _ = reference
    data = (folder / "native.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 100])
    assert "truncated" in header_problem(str(tmp_path / "cut.dcm"))
    ds = _dataset(arr)
    del ds.PixelData
    _save(ds, tmp_path / "nopix.dcm")
    assert "no pixel data" in header_problem(str(tmp_path / "nopix.dcm"))
    with pytest.raises(ImageLoadError):
        load_image(tmp_path / "nopix.dcm")


@pytest.mark.parametrize("kind", ["window", "sigmoid", "minmax", "monochrome1", "signed"])
def test_lookup_table_pipeline_equals_the_elementwise_one(kind):
    """dicom_to_uint8 runs the VOI pipeline once per distinct stored value; the pixels must not change."""
    from clinicalblip.data import images as I

    rng = np.random.default_rng(0)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -1024
    ds.PhotometricInterpretation = "MONOCHROME1" if kind == "monochrome1" else "MONOCHROME2"
    if kind in ("window", "sigmoid", "monochrome1"):
        ds.WindowCenter, ds.WindowWidth = 900, 1500
    if kind == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    arr = rng.integers(-2000, 2000, (300, 200)).astype(np.int16) if kind == "signed" \
        else rng.integers(100, 4095, (300, 200)).astype(np.uint16)
    direct = I._pipeline(arr, ds, str(ds.PhotometricInterpretation))
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16 if kind == "signed" else 12, 15 if kind == "signed" else 11
    ds.PixelRepresentation, ds.SamplesPerPixel = int(kind == "signed"), 1
    ds.PixelData = arr.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.dcm"
        ds.save_as(path, enforce_file_format=True)
        np.testing.assert_array_equal(dicom_to_uint8(path), direct)


def test_jpeg2000_draft_decodes_at_reduced_resolution_and_matches_after_the_resize(tmp_path):
    """With a draft size, JPEG 2000 drops wavelet levels (as JPEG draft mode uses DCT scaling)."""
    from PIL import Image

    y, x = np.mgrid[0:384, 0:320] / 384.0
    arr = ((0.5 + 0.3 * np.sin(5 * x) * np.cos(3 * y)) * 4095).astype(np.uint16)
    ds = _dataset(arr)
    ds.compress(JPEG2000Lossless, arr)
    path = _save(ds, tmp_path / "j2k.dcm")
    full = dicom_to_uint8(path)
    small = dicom_to_uint8(path, draft_size=(64, 64))
    assert full.shape == (384, 320) and small.shape == (96, 80)  # two levels dropped: still >= 64
    resize = lambda a: np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC)).astype(int)  # noqa: E731
    assert np.abs(resize(full) - resize(small)).mean() < 2.0  # about one gray level: what draft JPEG gives too
    assert load_image(path, draft_size=(64, 64)).size == (80, 96)
