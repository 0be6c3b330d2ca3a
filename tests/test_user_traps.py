"""Issue 24 items 9-15: traps a careful user still hits, each fed here and answered with the right result or a
one-line `error:` naming the key, flag or file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import REPO

from clinicalblip import cli


def _one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"clinicalblip {verb}: error: "), err
    return err


def _no_loading(monkeypatch):
    """Anything that would load data or a model fails the test: the error must come first."""
    import clinicalblip.merge as merge
    import clinicalblip.train as train

    def boom(*a, **k):
        raise AssertionError("loading started before the input was checked")

    monkeypatch.setattr(train, "train_stage", boom)
    monkeypatch.setattr(merge, "merge_stage_chain", boom)


# ---------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("override,words", [
    ("optim.lr=-1", "optim.lr must be a positive number, got -1"),
    ("optim.lr=0", "optim.lr must be a positive number"),
    ("data.max_views=0", "data.max_views must be >= 1"),
    ("data.max_report_tokens=0", "data.max_report_tokens must be >= 1"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio must be in [0, 1)"),
    ("optim.lr_mult.vision_model=0", "optim.lr_mult.vision_model must be > 0"),
])
def test_bad_numbers_in_a_stage_config_are_one_line_errors_before_loading(override, words, tmp_path, monkeypatch,
                                                                         capsys):
    _no_loading(monkeypatch)
    rc = cli.main(["train", str(REPO / "configs" / "tiny" / "stage1.yaml"), override,
                   f"output_dir={tmp_path / 'out'}", f"data.manifest={tmp_path / 'm.jsonl'}"])
    assert rc == 2
    assert words in _one_line_error(capsys, "train")


def test_generate_num_beams_0_is_a_one_line_error_before_loading(tmp_path, monkeypatch, capsys):
    import clinicalblip.generate as G

    monkeypatch.setattr(G.ReportModel, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert cli.main(["generate", str(tmp_path), "--manifest", "m.jsonl", "--out", "p.jsonl", "--num-beams", "0"]) == 2
    assert "--num-beams: 0 is out of range [1, inf)" in _one_line_error(capsys, "generate")


def test_merge_metrics_given_a_predictions_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "1", "prediction": "a", "reference": "b"}\n{"id": "2", "prediction": "a", '
                     '"reference": "b"}\n')
    assert cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "rel"), "--metrics", str(preds)]) == 2
    err = _one_line_error(capsys, "merge")
    assert "preds.jsonl: not a metrics.json" in err and "predictions JSONL" in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert cli.main(["merge", str(tmp_path), "--out", str(tmp_path / "rel"), "--metrics", str(other)]) == 2
    assert "no 'n', 'protocol' or 'clinical' key" in _one_line_error(capsys, "merge")


# ---------------------------------------------------------------------------------------------- item 13
def _weights(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_weights_in_stages_and_releases_get_the_umask_mode(stage1_dir, trained_release):
    from clinicalblip.filemode import umask_file_mode

    want = umask_file_mode()
    stage_files = _weights(stage1_dir)
    names = {p.name for p in stage_files}
    assert "adapter_model.safetensors" in names or "trained.safetensors" in names, names
    release_files = _weights(trained_release)
    assert release_files
    for p in stage_files + release_files:
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_give_umask_mode_follows_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from clinicalblip.filemode import give_umask_mode

    old = os.umask(0o002)
    try:
        (tmp_path / "a").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp_path / "a" / "x.safetensors"))
        assert stat.S_IMODE((tmp_path / "a" / "x.safetensors").stat().st_mode) == 0o600  # what safetensors does
        give_umask_mode(tmp_path)
        assert stat.S_IMODE((tmp_path / "a" / "x.safetensors").stat().st_mode) == 0o664
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------- item 15
def test_release_records_stage_paths_relative_to_itself(trained_release):
    meta = json.loads((trained_release / "clinicalblip.json").read_text())
    for st in meta["stages"]:
        assert not os.path.isabs(st["dir"]), st
        assert (trained_release / st["dir"] / "stage.json").is_file()
