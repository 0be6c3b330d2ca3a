"""The command line end to end on the tiny model, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "clinicalblip", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"clinicalblip {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_end_to_end_cli(tmp_path):
    """synth -> train stage 1 -> train stage 2 -> generate (split + one study) -> eval -> merge."""
    data = tmp_path / "data"
    cli("data", "synth", "--out", data, "--n", "30", "--seed", "1")
    manifest = data / "manifest.jsonl"
    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(recs) == 30 and {r["split"] for r in recs} <= {"train", "val", "test"}

    common = [f"data.manifest={manifest}", "train.max_steps=2", "train.batch_size=4", "data.val_max=4"]
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    out = cli("train", REPO / "configs/tiny/stage1.yaml", f"output_dir={s1}", *common)
    assert "stage 'stage1'" in out.stdout and "trainable" in out.stdout  # run header with the trainable report
    cli("train", REPO / "configs/tiny/stage2.yaml", f"output_dir={s2}", f"parent={s1}", *common)
    assert json.loads((s2 / "stage.json").read_text())["parent"] == "../stage1"
    assert (s2 / "metrics.jsonl").read_text().count("\n") >= 2

    preds = tmp_path / "preds.jsonl"
    cli("generate", s2, "--manifest", manifest, "--split", "test", "--out", preds, "--max-new-tokens", "12")
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    test_ids = {r["id"] for r in recs if r["split"] == "test"}
    assert {r["id"] for r in rows} == test_ids and len(rows) == len(test_ids)
    assert all(set(r) >= {"id", "prediction", "reference"} for r in rows)
    assert json.loads(Path(str(preds) + ".meta.json").read_text())["template"] == "findings_with_context"
    # a rerun skips finished ids: nothing is duplicated
    cli("generate", s2, "--manifest", manifest, "--split", "test", "--out", preds, "--max-new-tokens", "12")
    assert len(preds.read_text().splitlines()) == len(test_ids)

    study = next(r for r in recs if len(r["images"]) == 2)
    single = cli("generate", s2, *sum((["--image", data / im["path"]] for im in study["images"]), []),
                 "--indication", "Chest pain.", "--json", "--max-new-tokens", "10")
    j = json.loads(single.stdout.strip().splitlines()[-1])
    assert set(j) >= {"prompt", "qformer_prompt", "report", "max_new_tokens"}
    assert j["prompt"].startswith("Indication: Chest pain.") and j["max_new_tokens"] == 10

    metrics = tmp_path / "metrics.json"
    cli("eval", preds, "--out", metrics, "--bootstrap", "0")
    m = json.loads(metrics.read_text())
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "clinical_macro_f1"):
        assert key in m

    release = tmp_path / "release"
    out = cli("merge", s2, "--out", release)
    assert "verification" in out.stdout
    assert (release / "config.json").is_file() and (release / "README.md").is_file()
    assert any(release.glob("*.safetensors"))


@pytest.mark.parametrize("args,needle", [
    (["train", "no/such/config.yaml"], "config not found"),
    (["generate", "no/such/model", "--image", "x.png"], "image not found"),
    (["generate", "no/such/model", "--manifest", "m.jsonl", "--out", "p.jsonl"], "manifest not found"),
    (["merge", "no/such/stage", "--out", "rel"], "not a stage folder"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    proc = cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_yaml_key_is_one_clear_line(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text((REPO / "configs/tiny/stage1.yaml").read_text().replace("context_dropout", "context_dropuot"))
    proc = cli("train", cfg, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown key 'data.context_dropuot'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_template_is_one_clear_line(tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("L", (64, 64)).save(img)
    proc = cli("train", REPO / "configs/tiny/stage1.yaml", "data.template=nope", f"output_dir={tmp_path / 'o'}",
               f"data.manifest={tmp_path / 'm.jsonl'}", cwd=tmp_path, check=False)
    # no manifest yet: that is what is reported first (the data are checked before anything else loads)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"clinicalblip train: error: manifest not found: {tmp_path / 'm.jsonl'}"
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "split": "train", "images": [{"path": "x.png"}],
                                                  "findings": "Clear."}) + "\n")
    proc = cli("train", REPO / "configs/tiny/stage1.yaml", "data.template=nope", f"output_dir={tmp_path / 'o'}",
               f"data.manifest={tmp_path / 'm.jsonl'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown template 'nope'" in proc.stderr and "findings_with_context" in proc.stderr


def test_help_is_for_users_and_every_flag_has_help():
    import argparse

    from clinicalblip.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "Radiology report generation" in top and "one parser per verb" not in top

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield f"{path} {action.option_strings or action.dest}", action

    missing = [where for where, a in walk(parser, "clinicalblip") if not a.help]
    assert missing == []
    enc = next(a for w, a in walk(parser, "clinicalblip") if "jsonl" in w and "--encoding" in a.option_strings)
    assert enc.default == "utf-8-sig" and "default utf-8-sig" in enc.help
