"""`data cache`: cached pixel_values equal the raw path's, the build is resumable and rebuilds changed sources,
unreadable images are listed, and training / generation read from the cache (even with the sources gone)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.cli import main
from clinicalblip.data.cache import ImageCache, PixelSource, build_cache, find_image_cache
from clinicalblip.data.images import load_image
from clinicalblip.errors import UserError

SIZE = 64


def _processor(size=SIZE):
    from clinicalblip.tiny import BlipImageProcessor

    return BlipImageProcessor(size={"height": size, "width": size}, do_resize=True, do_rescale=True,
                              do_normalize=True, do_convert_rgb=True)


def _radiograph(h, w, seed=0):
    """Smooth anatomy-like gradients plus noise: what a chest film looks like to a resampler."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) - 0.2 * ((x - 0.5) ** 2 + (y - 0.4) ** 2)
    return np.clip(base + rng.normal(0, 0.03, (h, w)), 0, 1)


def _dicom(path: Path, arr16: np.ndarray, monochrome1=False):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = arr16.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = arr16.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def images(tmp_path):
    """One image of each kind the cache reads, at sizes where draft decoding kicks in."""
    d = tmp_path / "src"
    d.mkdir()
    g = _radiograph(600, 500)
    Image.fromarray((g * 255).astype(np.uint8)).save(d / "gray.png")
    Image.fromarray((g * 65535).astype(np.uint16)).save(d / "deep.png")  # 16-bit PNG
    Image.fromarray((g * 255).astype(np.uint8)).save(d / "film.jpg", quality=90)
    rgb = np.stack([g, g[::-1], g[:, ::-1]], -1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(d / "colour.jpg", quality=90)
    _dicom(d / "ct.dcm", g * 4095)
    _dicom(d / "inverted.dcm", g * 4095, monochrome1=True)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    names = ["gray.png", "deep.png", "film.jpg", "colour.jpg", "ct.dcm", "inverted.dcm"]
    recs = [{"id": f"s{i}", "patient_id": f"p{i}", "split": "train", "findings": "Clear.",
             "images": [{"path": f"src/{n}", "view": "PA"}]} for i, n in enumerate(names)]
    recs.append({"id": "bad", "patient_id": "pb", "split": "train", "findings": "Clear.",
                 "images": [{"path": "src/broken.png", "view": "PA"}, {"path": "src/gone.png", "view": "LATERAL"}]})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return manifest, d, names


def test_cached_pixel_values_equal_the_raw_path(images, tmp_path):
    manifest, d, names = images
    summary = build_cache(manifest, tmp_path / "cache", SIZE, workers=2, chunk=2, progress=False)
    assert (summary.images, summary.built, summary.failed) == (8, 6, 2)
    ip = _processor()
    cached = PixelSource(ip, tmp_path / "cache")
    # one uint8 step after the resize, in normalised units
    one_level = 1.0 / 255.0 / min(ip.image_std) + 1e-5
    for n in names:
        p = str(d / n)
        c = cached.get(p)
        # the raw path: decode (JPEG draft, as the raw loader and the cache both do) + the model's processor
        raw = ip([load_image(p, draft_size=(SIZE, SIZE))], return_tensors="pt")["pixel_values"][0]
        assert c.shape == raw.shape == (3, SIZE, SIZE)
        assert (c - raw).abs().max().item() <= one_level, n
    assert cached.misses == 0
    assert ImageCache(tmp_path / "cache").entries[str(d / "gray.png")][2] == 1  # grayscale stored once
    assert ImageCache(tmp_path / "cache").entries[str(d / "colour.jpg")][2] == 3
    # draft decoding really is DCT-scaled, and lands close to a full decode after the resize
    full = ip([load_image(d / "film.jpg")], return_tensors="pt")["pixel_values"][0]
    draft = cached.get(str(d / "film.jpg"))
    assert 0 < (full - draft).abs().mean().item() < 3 * one_level
    with Image.open(d / "film.jpg") as im:
        im.draft("L", (SIZE, SIZE))
        assert im.size == (125, 150)  # 1/4 of 500x600: the smallest scale still >= 64


def test_unreadable_images_are_listed_and_the_build_goes_on(images, tmp_path, capsys):
    manifest, d, _ = images
    assert main(["data", "cache", str(manifest), "--out", str(tmp_path / "cache"), "--size", str(SIZE),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 built now" in out and "2 unreadable" in out
    errors = {e["src"]: e["reason"] for e in map(json.loads, (tmp_path / "cache" / "errors.jsonl").open())}
    assert "cannot identify image" in errors[str(d / "broken.png")] or "cannot decode" in errors[str(d / "broken.png")]
    assert "not found" in errors[str(d / "gone.png")]


def test_rerun_skips_finished_and_rebuilds_changed_sources(images, tmp_path):
    manifest, d, _ = images
    out = tmp_path / "cache"
    build_cache(manifest, out, SIZE, workers=1, progress=False)
    again = build_cache(manifest, out, SIZE, workers=1, progress=False)
    assert (again.built, again.reused) == (0, 6)
    # an interrupted build: the index holds only what finished; the rest is built on the rerun
    lines = (out / "index.jsonl").read_text().splitlines()
    (out / "index.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # + a line cut mid-write
    resumed = build_cache(manifest, out, SIZE, workers=1, progress=False)
    assert (resumed.built, resumed.reused) == (2, 4)
    # touched (mtime changes, bytes do not): kept; rewritten: rebuilt with the new pixels
    st = os.stat(d / "gray.png")
    os.utime(d / "gray.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    before = PixelSource(_processor(), out).get(str(d / "deep.png"))
    Image.fromarray(np.full((600, 500), 40000, np.uint16)).save(d / "deep.png")
    later = build_cache(manifest, out, SIZE, workers=1, progress=False)
    assert (later.built, later.reused) == (1, 5)
    after = PixelSource(_processor(), out).get(str(d / "deep.png"))
    assert not np.allclose(before.numpy(), after.numpy())
    assert np.allclose(after.numpy(), PixelSource(_processor()).get(str(d / "deep.png")).numpy(), atol=1e-5)


def test_cache_of_another_size_is_refused(images, tmp_path):
    manifest, _, _ = images
    build_cache(manifest, tmp_path / "cache", 32, workers=1, progress=False)
    with pytest.raises(UserError, match="--size 64"):
        PixelSource(_processor(), tmp_path / "cache")
    with pytest.raises(UserError, match="size"):
        build_cache(manifest, tmp_path / "cache", 48, workers=1, progress=False)
    with pytest.raises(UserError, match="not an image cache"):
        find_image_cache(str(tmp_path / "src"))
    assert find_image_cache("", tmp_path / "cache" / "manifest.jsonl") == str((tmp_path / "cache").resolve())


def test_training_and_generation_read_from_the_cache(synth_manifest, tmp_path):
    """With every source image deleted after the build, only a run that reads the cache can work."""
    from conftest import tiny_stage_cfg

    from clinicalblip.generate import generate_split
    from clinicalblip.train import train_stage

    data = tmp_path / "data"
    shutil.copytree(synth_manifest.parent, data)
    manifest = data / synth_manifest.name
    summary = build_cache(manifest, tmp_path / "cache", SIZE, workers=1, progress=False)
    assert summary.failed == 0 and summary.built == summary.images
    for p in (data / "images").rglob("*.png"):
        p.unlink()
    stage = tmp_path / "stage"
    cfg = tiny_stage_cfg("stage1.yaml", manifest, stage, **{"train.max_steps": 1, "data.image_cache": str(tmp_path / "cache"),
                                                             "data.cache_images": False, "data.num_workers": 1})
    train_stage(cfg)
    assert (stage / "stage.json").is_file()
    preds = tmp_path / "preds.jsonl"
    n = generate_split(str(stage), str(tmp_path / "cache" / "manifest.jsonl"), "test", str(preds), limit=3,
                       batch_size=2, num_workers=1, max_new_tokens=4)
    assert n == 3 and len(preds.read_text().splitlines()) == 3
