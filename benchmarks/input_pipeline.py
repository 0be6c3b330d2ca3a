"""How fast the training input pipeline delivers MIMIC-sized studies, and how fast a 100k-record run starts.

Generates studies locally (2 views each, 2500x3000 like MIMIC-CXR-JPG) in three variants:

    jpeg      8-bit JPEG, quality 90 (MIMIC-CXR-JPG)
    dicom16   uncompressed 16-bit DICOM (12 bits stored, window center/width; MIMIC-CXR DICOM)
    j2k       JPEG 2000 lossless DICOM (how many archives store them)

and measures studies/s delivered by the training DataLoader (make_loader + StudyCollator at the BLIP input
size, batch 8, the main process only consuming) for:

    raw, 0 workers      the path before the image cache and workers (full decode + processor in the main
                        process; for JPEG this is the "4.5 studies/s" of issue 14)
    raw, workers+draft  loader workers, JPEGs decoded in draft mode (DCT scaling)
    cache               `data cache` pixels (build images/s reported too, per core)

and the startup of `clinicalblip train` on a manifest of --startup-records studies x 2 views (tiny PNGs,
hard links to a few distinct files, so 200k directory entries cost little disk): seconds from process start
to the first logged step, then again for a second run on the same manifest (the stored record check).

    python benchmarks/input_pipeline.py [--studies 24] [--dicom-studies 6] [--size 224] [--workers 2]
                                        [--variants jpeg,dicom16,j2k] [--startup-records 100000]

Prints a table and writes input_pipeline.json to $OUT if set, else runs/bench/. Note the machine's load:
on a shared 2-core box other processes take cores, and the numbers drop with them (load average recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clinicalblip.data.cache import PixelSource, build_cache  # noqa: E402
from clinicalblip.data.collate import StudyCollator  # noqa: E402
from clinicalblip.data.loader import available_cpus, make_loader  # noqa: E402
from clinicalblip.data.manifest import read_manifest, write_manifest  # noqa: E402
from clinicalblip.prompts import load_template  # noqa: E402

H, W = 3000, 2500
FINDINGS = ["The lungs are clear.", "Heart size is normal.", "No pleural effusion or pneumothorax.",
            "There is opacity in the right lower lobe.", "Mild degenerative changes of the spine.",
            "The cardiomediastinal silhouette is within normal limits.", "Small left pleural effusion."]


def radiograph(seed: int) -> np.ndarray:
    """A 2500x3000 film-like image in [0, 1]: smooth anatomy-scale structure plus fine noise (texture
    matters to JPEG and JPEG 2000 sizes and so to decode time)."""
    rng = np.random.default_rng(seed)
    small = rng.random((30, 25)).astype(np.float32)
    base = np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC), dtype=np.float32)
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, W, dtype=np.float32)[None, :]
    img = 0.55 + 0.25 * np.sin(5 * x + seed) * np.cos(3 * y) + 0.15 * (base - 0.5)
    img += rng.normal(0, 0.02, (H, W)).astype(np.float32)
    return np.clip(img, 0, 1)


def write_dicom(path: Path, arr16: np.ndarray, syntax=None) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr16.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ViewPosition = "PA"
    ds.PixelData = arr16.tobytes()
    if syntax is not None:
        ds.compress(syntax, arr16)
    ds.save_as(path, enforce_file_format=True)


def make_variant(root: Path, variant: str, n_studies: int, distinct: int = 4) -> Path:
    """n_studies x 2 views of one variant; `distinct` different images, copied to distinct files."""
    from pydicom.uid import JPEG2000Lossless

    d = root / variant
    d.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": "jpg", "dicom16": "dcm", "j2k": "dcm"}[variant]
    sources = []
    for k in range(distinct):
        img = radiograph(k)
        p = d / f"src{k}.{ext}"
        if variant == "jpeg":
            Image.fromarray((img * 255).astype(np.uint8)).save(p, quality=90)
        else:
            write_dicom(p, (img * 4095).astype(np.uint16), JPEG2000Lossless if variant == "j2k" else None)
        sources.append(p)
    records = []
    for i in range(n_studies):
        images = []
        for v, view in enumerate(("PA", "LATERAL")):
            p = d / f"s{i}_{v}.{ext}"
            shutil.copyfile(sources[(2 * i + v) % distinct], p)
            images.append({"path": p.name, "view": view})
        records.append({"id": f"{variant}-{i}", "patient_id": f"p{i}", "split": "train", "images": images,
                        "indication": "Cough.", "findings": " ".join(FINDINGS[i % 3: i % 3 + 3]),
                        "impression": "No acute disease."})
    manifest = d / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest


def delivered(records, collate, workers: int, batch_size: int, epochs: int = 1, warm: bool = False) -> float:
    """Studies/s the DataLoader hands to the training loop (the main process only counts)."""
    loader = make_loader(records, batch_size, collate, num_workers=workers, pin_memory=False)
    if warm:
        for _ in loader:  # start the workers and fill the page cache: steady state is what is measured
            pass
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["ids"])
    return n / (time.perf_counter() - t0)


def collator(processor, source):
    return StudyCollator(processor=processor, template=load_template("findings_with_context"),
                         num_query_tokens=processor.num_query_tokens, image_cache=source)


def startup(root: Path, n: int, timeout: float) -> dict:
    """Seconds from `clinicalblip train` start to its first logged step, for a first and a second run."""
    d = root / "startup"
    img_dir = d / "images"
    img_dir.mkdir(parents=True)
    distinct = []
    for k in range(16):
        p = img_dir / f"base{k}.png"
        Image.fromarray(np.full((64, 64), 40 + 10 * k, np.uint8)).save(p)
        distinct.append(p)
    t0 = time.perf_counter()
    records = []
    for i in range(n):
        sub = img_dir / f"{i % 256:03d}"
        if i < 256:
            sub.mkdir()
        images = []
        for v, view in enumerate(("PA", "LATERAL")):
            p = sub / f"{i}_{v}.png"
            os.link(distinct[(2 * i + v) % len(distinct)], p)
            images.append({"path": f"images/{sub.name}/{p.name}", "view": view})
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        records.append({"id": f"s{i}", "patient_id": f"p{i}", "split": split, "images": images,
                        "indication": "Chest pain.", "findings": " ".join(FINDINGS[i % 4: i % 4 + 3]),
                        "impression": "No acute disease."})
    manifest = d / "manifest.jsonl"
    write_manifest(records, manifest)
    made = time.perf_counter() - t0
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", CLINICALBLIP_CACHE=str(d / "home"))
    out = {"records": n, "images": 2 * n, "generate_s": round(made, 1)}
    for run in ("first_run", "second_run"):
        cmd = [sys.executable, "-m", "clinicalblip", "train", str(REPO / "configs/tiny/stage1.yaml"),
               f"data.manifest={manifest}", f"output_dir={d / run}", "train.max_steps=1", "train.log_every=1",
               "train.batch_size=8", "data.val_max=8", "data.cache_images=false"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first, lines = None, []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if first is None and line.startswith("step 1/"):
                first = time.perf_counter() - t0
            if first is None and time.perf_counter() - t0 > timeout:
                proc.kill()
                break
        proc.wait()
        if proc.returncode not in (0, None) and first is None:
            print("\n".join(lines[-20:]), file=sys.stderr)
        out[f"{run}_to_first_step_s"] = round(first, 1) if first is not None else None
        out[f"{run}_check_reused"] = any("reusing the result" in l for l in lines)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=24, help="JPEG studies (2 views each)")
    ap.add_argument("--dicom-studies", type=int, default=6, help="studies per DICOM variant")
    ap.add_argument("--size", type=int, default=224, help="model input size (InstructBLIP: 224)")
    ap.add_argument("--workers", type=int, default=0, help="loader / cache workers (0: every CPU)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default="jpeg,dicom16,j2k")
    ap.add_argument("--startup-records", type=int, default=100_000, help="0 skips the startup measurement")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--keep", help="write the generated data here and keep it (default: a temp folder)")
    args = ap.parse_args()
    from clinicalblip.tiny import build_tiny_processor

    cpus = available_cpus()
    workers = args.workers or cpus
    processor = build_tiny_processor("tiny", image_size=args.size)
    ip = processor.image_processor
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clinicalblip-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "cpus": cpus, "workers": workers, "size": args.size,
              "batch_size": args.batch_size, "load_avg_start": os.getloadavg(), "variants": {}}
    rows = []
    try:
        for variant in [v for v in args.variants.split(",") if v]:
            n = args.studies if variant == "jpeg" else args.dicom_studies
            t0 = time.perf_counter()
            manifest = make_variant(root, variant, n)
            print(f"[{variant}] generated {n} studies in {time.perf_counter() - t0:.0f} s", flush=True)
            records = read_manifest(manifest)
            res = {"studies": n, "image_bytes": os.path.getsize(records[0]["images"][0]["path"])}
            res["raw_0_workers"] = delivered(records, collator(processor, PixelSource(ip, jpeg_draft=False)), 0,
                                             args.batch_size)
            res["raw_workers_draft"] = delivered(records, collator(processor, PixelSource(ip, jpeg_draft=True)),
                                                 workers, args.batch_size)
            cache_dir = root / f"cache-{variant}"
            summary = build_cache(manifest, cache_dir, args.size, workers=workers, progress=False)
            res["cache_build_images_per_s"] = summary.built / summary.seconds
            res["cache_build_images_per_s_per_core"] = res["cache_build_images_per_s"] / workers
            res["cache_failed"] = summary.failed
            # steady state over several passes (epochs); the records repeat so the run lasts long enough
            many = records * max(1, 400 // n)
            res["cache"] = delivered(many, collator(processor, PixelSource(ip, cache_dir)), workers,
                                     args.batch_size, epochs=2, warm=True)
            res["cache_0_workers"] = delivered(many, collator(processor, PixelSource(ip, cache_dir)), 0,
                                               args.batch_size)
            result["variants"][variant] = res
            rows.append((variant, res))
            print(f"[{variant}] raw/0 {res['raw_0_workers']:.1f}  raw/workers+draft {res['raw_workers_draft']:.1f}  "
                  f"cache {res['cache']:.1f} studies/s; cache build {res['cache_build_images_per_s']:.1f} img/s",
                  flush=True)
            shutil.rmtree(root / variant, ignore_errors=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
        if args.startup_records:
            result["startup"] = startup(root, args.startup_records, args.startup_timeout)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()

    print()
    print(f"input pipeline, {args.size}x{args.size} model input, batch {args.batch_size}, {workers} workers, "
          f"{cpus} CPUs (load avg {result['load_avg_start'][0]:.1f} at start, {result['load_avg_end'][0]:.1f} at end)")
    print(f"{'variant':<9} {'raw 0 workers':>14} {'raw workers+draft':>18} {'speed-up':>9} {'cache':>9} "
          f"{'cache 0 wkr':>12} {'build img/s':>12} {'per core':>9}   (studies/s unless noted)")
    for variant, r in rows:
        print(f"{variant:<9} {r['raw_0_workers']:>14.1f} {r['raw_workers_draft']:>18.1f} "
              f"{r['raw_workers_draft'] / r['raw_0_workers']:>8.1f}x {r['cache']:>9.1f} {r['cache_0_workers']:>12.1f} "
              f"{r['cache_build_images_per_s']:>12.1f} {r['cache_build_images_per_s_per_core']:>9.1f}")
    if "startup" in result:
        s = result["startup"]
        print(f"startup, {s['records']} records x 2 views: first step after {s['first_run_to_first_step_s']} s "
              f"(first run), {s['second_run_to_first_step_s']} s (second run, stored check reused: "
              f"{s['second_run_check_reused']})")
    out_dir = Path(os.environ.get("OUT") or REPO / "runs" / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "input_pipeline.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'input_pipeline.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
