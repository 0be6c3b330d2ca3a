"""The one image loader: PNG 8/16-bit, JPEG, DICOM (modality LUT, VOI LUT / window, MONOCHROME1, bit depths)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clinicalblip.data.images import ImageLoadError, is_dicom, load_image, window

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from conftest import dx_dataset  # noqa: E402

# A horizontal ramp: left dark, right bright (in stored values), so orientation and inversion are visible.
H, W = 8, 16


def ramp(max_value: int, dtype) -> np.ndarray:
    row = np.linspace(0, max_value, W).round().astype(dtype)
    return np.tile(row, (H, 1))


def write_dicom(path, arr, bits_stored, photometric="MONOCHROME2", **elements):
    dx_dataset(arr, bits_stored, photometric, **elements).save_as(path, enforce_file_format=True)
    return path


def gray(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (H, W, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].astype(int)


def test_png_8bit_and_jpeg_grayscale_become_rgb(tmp_path):
    arr = ramp(255, np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "a.png")
    Image.fromarray(arr, mode="L").save(tmp_path / "a.jpg", quality=95)
    assert (gray(load_image(tmp_path / "a.png")) == arr).all()
    jpg = gray(load_image(tmp_path / "a.jpg"))
    assert np.abs(jpg - arr).max() <= 8
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").mode == "RGB"


def test_png_16bit_uses_full_8bit_range(tmp_path):
    # 12-bit data in a 16-bit PNG: a fixed /257 would give a near-black image.
    arr = ramp(4095, np.uint16)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    with Image.open(tmp_path / "a16.png") as im:
        assert im.mode.startswith("I")
    g = gray(load_image(tmp_path / "a16.png"))
    assert g[0, 0] == 0 and g[0, -1] == 255
    assert (np.diff(g[0]) >= 0).all()


@pytest.mark.parametrize("bits,dtype", [(12, np.uint16), (16, np.uint16), (8, np.uint8)])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_bit_depths_and_photometric(tmp_path, bits, dtype, photometric):
    arr = ramp(2**bits - 1, dtype)
    path = write_dicom(tmp_path / "x.dcm", arr, bits, photometric)
    g = gray(load_image(path))
    if photometric == "MONOCHROME2":
        assert g[0, 0] == 0 and g[0, -1] == 255  # low stored value = dark
    else:
        assert g[0, 0] == 255 and g[0, -1] == 0  # MONOCHROME1: low value = bright, inverted for display
    assert np.abs(np.diff(g[0])).min() > 0


def test_dicom_12bit_with_high_bits_set_is_masked(tmp_path):
    # Bits above Bits Stored may hold overlay junk: pydicom masks them; the image must not be scrambled.
    arr = ramp(4095, np.uint16)
    path = write_dicom(tmp_path / "x.dcm", arr, 12)
    ds = pydicom.dcmread(path)
    junk = (arr | 0xF000).astype("<u2").tobytes()
    ds.PixelData = junk
    ds.save_as(path)
    g = gray(load_image(path))
    assert g[0, 0] == 0 and g[0, -1] == 255


def test_dicom_window_center_width(tmp_path):
    arr = ramp(4095, np.uint16)
    path = write_dicom(tmp_path / "w.dcm", arr, 12, WindowCenter=1024, WindowWidth=1024)
    g = gray(load_image(path))
    vals = arr[0]
    assert (g[0][vals <= 512] == 0).all()  # below the window: black
    assert (g[0][vals >= 1536] == 255).all()  # above: white
    inside = (vals > 600) & (vals < 1450)
    assert inside.any() and ((g[0][inside] > 0) & (g[0][inside] < 255)).all()


def test_dicom_modality_lut_then_window_and_signed_pixels(tmp_path):
    # Signed stored values with a rescale to Hounsfield-like units; the window is in rescaled units.
    arr = np.tile(np.linspace(-1000, 1000, W).round().astype(np.int16), (H, 1))
    path = write_dicom(tmp_path / "s.dcm", arr, 16, RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=-100, WindowWidth=2000)
    g = gray(load_image(path))
    hu = arr[0] * 2 - 100
    assert (g[0][hu <= -1100] == 0).all() and (g[0][hu >= 900] == 255).all()
    assert (np.diff(g[0]) >= 0).all()
    # Without the rescale the same window would clip differently: proves the modality LUT is applied first.
    path2 = write_dicom(tmp_path / "s2.dcm", arr, 16, WindowCenter=-100, WindowWidth=2000)
    assert not (gray(load_image(path2)) == g).all()


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_dicom_voi_lut_sequence_preferred_over_window(tmp_path, vr):
    arr = ramp(4095, np.uint16)
    item = Dataset()
    # 4096-entry LUT starting at 0, 8-bit output: a step function (dark below 2048, bright above).
    lut = np.where(np.arange(4096) < 2048, 10, 200).astype(np.uint16)
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
    path = write_dicom(tmp_path / "v.dcm", arr, 12, VOILUTSequence=Sequence([item]),
                       WindowCenter=2048, WindowWidth=4096)
    g = gray(load_image(path))
    assert set(np.unique(g)) == {0, 255}  # the LUT's own range 10..200 maps to black..white
    assert (g[0][arr[0] < 2048] == 0).all() and (g[0][arr[0] >= 2048] == 255).all()
    # MONOCHROME1 with the same LUT: inverted after the VOI LUT
    path1 = write_dicom(tmp_path / "v1.dcm", arr, 12, "MONOCHROME1", VOILUTSequence=Sequence([item]))
    assert (gray(load_image(path1)) == 255 - g).all()


def test_dicom_without_extension_is_detected(tmp_path):
    path = write_dicom(tmp_path / "IM0001", ramp(4095, np.uint16), 12)
    assert is_dicom(path)
    assert gray(load_image(path))[0, -1] == 255


def test_window_linear_matches_dicom_definition():
    x = np.array([0.0, 511.5, 1024.0, 1536.0, 4095.0])
    y = window(x, 1024, 1024)
    assert y[0] == 0 and y[-1] == 1 and abs(y[2] - 0.5) < 1e-3


def test_missing_and_corrupt_files_raise_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image(bad)
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02" * 10)
    with pytest.raises(ImageLoadError):
        load_image(bad_dcm)
