"""The command line end to end on the tiny model, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NET_TRAP = Path(__file__).resolve().parent / "nettrap"
# third-party lines a user cannot act on (issue 20): bitsandbytes' hub-kernel lines, the kernels package's
# trust notice, DeepSpeed's accelerator notice
NOISE = re.compile(r"bitsandbytes|kernels-community|gemm_4bit|publisher trust|Setting accelerator|DeepSpeed",
                   re.IGNORECASE)


def trapped_env(trap_log: Path) -> dict:
    """The user's environment without any *_OFFLINE switch, with every non-loopback connection trapped."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(NET_TRAP), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["CLINICALBLIP_NET_TRAP"] = str(trap_log)
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return env


def assert_offline_and_quiet(proc_stderr: str, trap_log: Path, what: str) -> None:
    attempts = trap_log.read_text() if trap_log.exists() else ""
    assert not attempts, f"{what} tried to reach the network:\n{attempts}"
    noisy = [line for line in proc_stderr.splitlines() if NOISE.search(line)]
    assert not noisy, f"{what} printed third-party notices:\n" + "\n".join(noisy)


def cli(*args, cwd=None, check=True):
    """`python -m clinicalblip ARGS` as a user runs it: no HF_HUB_OFFLINE, the network trapped, stderr quiet."""
    trap_log = Path(os.environ.get("PYTEST_TMP_TRAP", "/tmp")) / f"cb-net-trap-{os.getpid()}-{time.time_ns()}.log"
    # bytes, decoded by hand: text=True would turn every \r into \n and hide what a log file receives
    raw = subprocess.run([sys.executable, "-m", "clinicalblip", *map(str, args)], cwd=cwd or REPO,
                         env=trapped_env(trap_log), capture_output=True, timeout=600)
    proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    if check and proc.returncode != 0:
        raise AssertionError(f"clinicalblip {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        assert_offline_and_quiet(proc.stderr, trap_log, f"clinicalblip {args[0]}")
        # piped, as in `./train.sh > log`: progress is plain lines, never carriage-return bar updates
        assert "\r" not in proc.stdout + proc.stderr, f"clinicalblip {args[0]} wrote carriage returns to a pipe"
    finally:
        trap_log.unlink(missing_ok=True)
    return proc


def test_end_to_end_cli(tmp_path):
    """synth -> train stage 1 -> train stage 2 -> generate (split + one study) -> eval -> merge."""
    data = tmp_path / "data"
    cli("data", "synth", "--out", data, "--n", "40", "--seed", "1")  # patients over time: 2 test studies
    manifest = data / "manifest.jsonl"
    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(recs) == 40 and {r["split"] for r in recs} <= {"train", "val", "test"}

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

    # the other verbs on local files, trapped the same way
    cli("data", "check", manifest)
    cli("label", preds, "--out", tmp_path / "labels.csv")
    cli("view", preds, "--out", tmp_path / "view.html", "--bootstrap", "0", "--skip-java-metrics")
    cli("compare", preds, preds, "--names", "a", "b", "--out", tmp_path / "cmp.json", "--resamples", "200",
        "--skip-java-metrics")
    assert_serve_starts_offline(release, tmp_path)


def assert_serve_starts_offline(model: Path, tmp_path: Path) -> None:
    """`serve` up to a healthy /health (model worker loaded), with the network trapped, then stopped."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trap_log = tmp_path / "serve-trap.log"
    proc = subprocess.Popen([sys.executable, "-m", "clinicalblip", "serve", str(model), "--port", str(port)],
                            cwd=REPO, env=trapped_env(trap_log), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline, health = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    health = json.loads(r.read())
                if health.get("model_loaded"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert health and health.get("model_loaded"), f"serve did not come up: {health}"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert_offline_and_quiet(err, trap_log, "clinicalblip serve")


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
