"""The built-in synthetic dataset: determinism, splits, labeler, findings visible in the images."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.data.manifest import read_manifest
from clinicalblip.data.synth import (
    FINDINGS,
    GENERIC_INDICATION,
    UNINFORMATIVE_INDICATIONS,
    compose_report,
    label_report,
    render_study,
    sample_details,
    sample_labels,
    write_synthetic_dataset,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(out, n=200, seed=3)


def _records(manifest):
    return [json.loads(line) for line in Path(manifest).read_text().splitlines() if line.strip()]


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_given_seed(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n=40, seed=7)
    b = write_synthetic_dataset(tmp_path / "b", n=40, seed=7)
    c = write_synthetic_dataset(tmp_path / "c", n=40, seed=8)
    assert a.name == "manifest.jsonl" and a.parent == tmp_path / "a"
    assert a.read_bytes() == b.read_bytes()
    assert _tree_digest(a.parent) == _tree_digest(b.parent)
    assert a.read_bytes() != c.read_bytes()


def test_schema_and_files(small):
    recs = _records(small)
    assert len(recs) == 200
    assert len({r["id"] for r in recs}) == 200
    for r in recs:
        assert r["id"].startswith("synth-") and r["dataset"] == "synthetic"
        assert set(r["labels"]) == set(FINDINGS) and set(r["labels"].values()) <= {0, 1}
        assert set(r["subtle"]) <= {f for f in FINDINGS if r["labels"][f]}
        assert r["indication"] and r["findings"] and r["impression"]
        assert r["images"][0]["view"] == "PA" and r["images"][0]["path"] == f"images/{r['id']}_frontal.png"
        if len(r["images"]) == 2:
            assert r["images"][1] == {"path": f"images/{r['id']}_lateral.png", "view": "LATERAL"}
        assert 12 <= len(r["findings"].split()) <= 55
    # read back through the project's reader; files exist and decode as 8-bit grayscale
    loaded = read_manifest(small)
    for r in loaded[:60]:
        for im in r["images"]:
            with Image.open(im["path"]) as img:
                assert img.mode == "L" and img.size == (64, 64)
                img.load()
    assert any(r["history"] is None for r in recs) and any(r["history"] for r in recs)
    assert any(r["comparison"] is None for r in recs) and any(r["comparison"] for r in recs)


def test_missing_lateral_present(small):
    recs = _records(small)
    missing = [r for r in recs if len(r["images"]) == 1]
    assert 1 <= len(missing) <= 30
    for r in missing:
        assert not (small.parent / "images" / f"{r['id']}_lateral.png").exists()


def test_splits_by_patient(small):
    recs = _records(small)
    assert set(r["split"] for r in recs) == {"train", "val", "test"}
    split_of = {}
    for r in recs:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    per_patient = Counter(r["patient_id"] for r in recs)
    assert max(per_patient.values()) == 4 and min(per_patient.values()) == 1  # 1-4 studies per patient
    counts = Counter(r["split"] for r in recs)
    assert counts["train"] > 0.65 * len(recs) and counts["val"] >= 5 and counts["test"] >= 5


def test_tiny_dataset_has_every_split(tmp_path):
    recs = _records(write_synthetic_dataset(tmp_path, n=6, seed=0))
    assert set(r["split"] for r in recs) == {"train", "val", "test"}


def test_clinical_mix(small):
    recs = _records(small)
    kinds = Counter(r["indication_type"] for r in recs)
    assert set(kinds) == {"informative", "misleading", "uninformative"}
    assert any(r["indication"] == GENERIC_INDICATION for r in recs)
    for r in recs:
        if r["indication_type"] == "uninformative":
            assert r["indication"] in UNINFORMATIVE_INDICATIONS
    normal = sum(not any(r["labels"].values()) for r in recs)
    assert 0.2 < normal / len(recs) < 0.55
    for f in FINDINGS:
        assert 0.08 < np.mean([r["labels"][f] for r in recs]) < 0.4


def test_labeler_recovers_generated_reports():
    rng = np.random.default_rng(11)
    for _ in range(2000):
        labels = sample_labels(rng)
        subtle = [f for f in FINDINGS if labels[f] and rng.random() < 0.25]
        details = sample_details(labels, subtle, rng)
        findings, impression = compose_report(labels, details, rng)
        assert label_report(findings) == labels, findings
        assert label_report(impression) == labels, impression


def test_labeler_on_dataset(small):
    for r in _records(small):
        assert label_report(r["findings"]) == r["labels"]


@pytest.mark.parametrize(
    "text, positive",
    [
        ("No pleural effusion or pneumothorax.", set()),
        ("No focal consolidation, pleural effusion, or pneumothorax.", set()),
        ("Heart size is normal. The lungs are clear.", set()),
        ("The heart is not enlarged. No pulmonary nodules.", set()),
        ("The heart is enlarged. No pleural effusion.", {"cardiomegaly"}),
        ("Moderate cardiomegaly with no pleural effusion.", {"cardiomegaly"}),
        ("There is a moderate right pleural effusion. No pneumothorax.", {"pleural_effusion"}),
        ("A small left apical pneumothorax is present.", {"pneumothorax"}),
        ("Patchy consolidation in the right lower lobe.", {"consolidation"}),
        ("A 1 cm nodule projects over the left upper lung.", {"nodule"}),
        ("No pneumothorax, but there is a small left pleural effusion.", {"pleural_effusion"}),
        ("no pneumothorax. the heart is enlarged. the heart is enlarged", {"cardiomegaly"}),
        ("", set()),
    ],
)
def test_labeler_examples(text, positive):
    out = label_report(text)
    assert set(out) == set(FINDINGS)
    assert {f for f, v in out.items() if v} == positive


# regions in normalised image coordinates (x0, x1, y0, y1) where each finding may change the frontal view
_REGIONS = {
    "cardiomegaly": (0.1, 0.9, 0.40, 0.90),
    "pleural_effusion": (0.05, 0.95, 0.35, 0.90),
    "pneumothorax": (0.05, 0.95, 0.05, 0.85),
    "consolidation": (0.05, 0.95, 0.05, 0.85),
    "nodule": (0.05, 0.95, 0.05, 0.85),
}


@pytest.mark.parametrize("finding", FINDINGS)
@pytest.mark.parametrize("subtle", [False, True])
def test_finding_changes_image_locally(finding, subtle):
    base = {f: 0 for f in FINDINGS}
    with_f = dict(base, **{finding: 1})
    sub = [finding] if subtle else []
    for seed in range(4):
        a, la = render_study(base, np.random.default_rng(seed), image_size=64)
        b, lb = render_study(with_f, np.random.default_rng(seed), image_size=64, subtle=sub)
        diff = np.abs(np.asarray(b, float) - np.asarray(a, float))
        changed = diff > 12
        assert changed.sum() >= (4 if subtle else 8), (finding, seed, changed.sum())
        x0, x1, y0, y1 = (int(round(v * 64)) for v in _REGIONS[finding])
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert outside.sum() == 0, (finding, seed)
        # the change is large where it happens, not a global shift
        assert changed.mean() < 0.25
        ldiff = np.abs(np.asarray(lb, float) - np.asarray(la, float))
        if finding in ("cardiomegaly", "pleural_effusion"):
            assert (ldiff > 12).sum() >= 4
        if finding in ("pneumothorax", "nodule"):
            assert ldiff.max() == 0


def test_finding_side_matches_image():
    base = {f: 0 for f in FINDINGS}
    for finding in ("pleural_effusion", "pneumothorax", "consolidation", "nodule"):
        for seed in range(6):
            lab = dict(base, **{finding: 1})
            d = sample_details(lab, [], np.random.default_rng(seed))
            side = d[finding]["side"]
            if side == "bilateral":
                continue
            a, _ = render_study(base, np.random.default_rng(seed))
            b, _ = render_study(lab, np.random.default_rng(seed))
            diff = np.abs(np.asarray(b, float) - np.asarray(a, float))
            left_half, right_half = diff[:, :32].sum(), diff[:, 32:].sum()
            # PA convention: the patient's right is on the image's left
            if side == "right":
                assert left_half > right_half, (finding, seed)
            else:
                assert right_half > left_half, (finding, seed)


def test_other_image_sizes():
    labels = dict.fromkeys(FINDINGS, 1)
    for size in (32, 128):
        fr, la = render_study(labels, np.random.default_rng(0), image_size=size)
        assert fr.size == (size, size) and la.size == (size, size) and fr.mode == "L"
