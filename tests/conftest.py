"""Shared fixtures: a small synthetic dataset and a two-stage tiny chain, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_stage_cfg(yaml_name: str, manifest: Path, out: Path, parent: Path | None = None, **over):
    """A shipped tiny stage YAML, pointed at test data, shortened to a couple of steps."""
    import yaml

    from clinicalblip.config import stage_config_from_dict

    data = yaml.safe_load((REPO / "configs" / "tiny" / yaml_name).read_text())
    data["output_dir"] = str(out)
    data["data"]["manifest"] = str(manifest)
    data["parent"] = str(parent) if parent else None
    overrides = ["train.max_steps=2", "train.batch_size=4", "data.val_max=4", "train.log_every=1"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return stage_config_from_dict(data, overrides)


def dx_dataset(pixels=None, bits_stored: int = 12, photometric: str = "MONOCHROME2", **elements):
    """A minimal Digital X-Ray DICOM dataset (explicit VR little endian) holding `pixels` and `elements`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored)
    for k, v in elements.items():
        setattr(ds, k, v)
    return ds


def copy_chain(stage1: Path, stage2: Path, tmp: Path) -> tuple[Path, Path]:
    """A private copy of the session's two-stage chain (tests that damage or edit stage folders use it)."""
    import shutil

    s1, s2 = tmp / "stage1", tmp / "stage2"
    shutil.copytree(stage1, s1, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(stage2, s2, ignore=shutil.ignore_patterns("checkpoints"))
    return s1, s2


@pytest.fixture(scope="session")
def synth_manifest(tmp_path_factory) -> Path:
    from clinicalblip.data.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n=40, seed=3)


@pytest.fixture(scope="session")
def stage1_dir(tmp_path_factory, synth_manifest) -> Path:
    from clinicalblip.train import train_stage

    out = tmp_path_factory.mktemp("chain") / "stage1"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out))
    return out


@pytest.fixture(scope="session")
def stage2_dir(stage1_dir, synth_manifest) -> Path:
    """Stage 2 with a non-identity LoRA start (lora.init=gaussian): merge checks cannot pass trivially."""
    from clinicalblip.train import train_stage

    out = stage1_dir.parent / "stage2"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir, **{"lora.init": "gaussian"}))
    return out


@pytest.fixture(scope="session")
def trained_release(synth_manifest, tmp_path_factory) -> Path:
    """A tiny release trained just long enough (80 steps, ~15 s) to write report sentences: for the server."""
    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.train import train_stage

    import torch

    root = tmp_path_factory.mktemp("served")
    stage = root / "stage1"
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core box two OpenMP threads per process spin against other processes (measured
    # 13x slower under load); on an idle box the tiny model barely gains from the second core.
    torch.set_num_threads(1)
    try:
        train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, stage,
                                   **{"train.max_steps": 80, "train.batch_size": 16, "train.log_every": 40}))
        merge_stage_chain(str(stage), str(root / "release"))
    finally:
        torch.set_num_threads(threads)
    return root / "release"
