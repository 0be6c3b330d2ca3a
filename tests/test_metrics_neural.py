"""The neural metrics without the real weights: stand-in checkpoints with the official names and layout (built here,
never downloaded) for loading, hashing, key mismatches and the whole eval path; RadGraph's rewards, BERTScore's and
RadCliQ's arithmetic against hand computations. Tests on the real weights run only when CLINICALBLIP_METRICS_DIR
exists."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clinicalblip import cli
from clinicalblip.errors import UserError
from clinicalblip.metrics import neural as N
from clinicalblip.metrics import weights as W
from clinicalblip.metrics.radgraph import RadGraph, entity_relation_f1, encoder_dir_for, reward, words

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics_standins as S  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
NEURAL_KEYS = ("chexbert_micro14_upos", "chexbert_macro5_uneg", "chexbert_example_f1", "sembscore", "bertscore_f1",
               "radgraph_simple", "radgraph_partial", "radgraph_complete", "radgraph_entity_relation",
               "radcliq_v1", "radcliq_v1_inverse")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return S.write_weights_dir(tmp_path_factory.mktemp("metrics-weights"))


@pytest.fixture
def standin_files(monkeypatch):
    """The kit's file list without the published hashes (the stand-in weights are not the published files)."""
    files = tuple(dataclasses.replace(f, sha256=None) for f in W.FILES)
    monkeypatch.setattr(W, "FILES", files)
    return files


def _preds(tmp_path: Path, name="preds.jsonl", shift=1) -> Path:
    rows = [{"id": f"s{i}", "reference": r, "prediction": S.CORPUS[(i + shift) % len(S.CORPUS)]}
            for i, r in enumerate(S.CORPUS)]
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ RadGraph rewards
def _ann(*ents):
    """Entities as (tokens, label, [(relation, target index 1-based), ...])."""
    return {"entities": {str(i + 1): {"tokens": t, "label": lab, "relations": [[r, str(j)] for r, j in rels]}
                         for i, (t, lab, rels) in enumerate(ents)}}


def test_radgraph_rewards_at_all_three_levels_by_hand():
    ref = _ann(("effusion", "OBS-DP", [("located_at", 2)]), ("pleural", "ANAT-DP", []),
               ("cardiomegaly", "OBS-DP", []))
    hyp = _ann(("Effusion", "OBS-DP", []), ("pleural", "ANAT-DP", []), ("edema", "OBS-DA", []))
    # simple: {effusion, pleural, cardiomegaly} vs {effusion, pleural, edema} (case-insensitive): P = R = 2/3
    assert reward(hyp, ref, "simple") == pytest.approx(2 / 3)
    # partial: ref effusion has a relation -> (effusion, OBS-DP, True); hyp's has none: only pleural matches
    assert reward(hyp, ref, "partial") == pytest.approx(1 / 3)
    # complete: ref {(effusion, OBS-DP, located_at, pleural), (pleural..), (cardiomegaly..)}; hyp matches pleural
    assert reward(hyp, ref, "complete") == pytest.approx(1 / 3)
    hyp2 = _ann(("effusion", "OBS-DP", [("located_at", 2), ("modify", 2)]), ("pleural", "ANAT-DP", []))
    # complete: hyp has 2 relation elements + pleural = 3, ref 3; 2 shared -> P = R = 2/3
    assert reward(hyp2, ref, "complete") == pytest.approx(2 / 3)
    assert reward(hyp2, ref, "partial") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    # RadCliQ: entity F1 (exact tokens) and relation F1
    e, r = entity_relation_f1(hyp2, ref)
    assert e == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3)) and r == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_radgraph_reward_edge_cases():
    a = _ann(("effusion", "OBS-DP", []))
    empty = {"entities": {}}
    for level in ("simple", "partial", "complete"):
        assert reward(empty, a, level) == 0.0 and reward(a, empty, level) == 0.0
        assert reward(empty, empty, level) == 0.0  # an empty side scores 0, even both
        assert reward(a, a, level) == 1.0
    assert entity_relation_f1(a, a) == (1.0, 0.0)  # no relation on either side: relation F1 0
    assert entity_relation_f1(empty, a) == (0.0, 0.0)
    with pytest.raises(ValueError):
        reward(a, a, "full")


def test_radgraph_word_tokenization():
    assert words("Heart size normal.No effusion (small)/none", "radgraph") == [
        "Heart", "size", "normal", ".", "No", "effusion", "(", "small", ")", "/", "none"]
    assert words("5-mm nodule, stable.", "radgraph-xl") == ["5", "-", "mm", "nodule", ",", "stable", "."]
    assert words("", "radgraph") == ["None"]


# ------------------------------------------------------------------------------------------------ BERTScore / RadCliQ
def test_bertscore_identity_rescale_and_hand_computation(weights_dir):
    d = weights_dir / "distilroberta-base"
    raw = N.BERTScorer(d, layer=5)
    same = raw.score(["no pleural effusion."], ["no pleural effusion."])
    assert same["f1"][0] == pytest.approx(1.0, abs=1e-5)
    # by hand from the layer-5 states: greedy matching without <s>/</s> weights
    cand, ref = "mild cardiomegaly.", "the heart is normal in size."
    got = raw.score([cand], [ref])
    out = []
    for t in (cand, ref):
        enc = raw.tok([t], return_tensors="pt")
        with torch.no_grad():
            h = raw.model(**enc, output_hidden_states=True).hidden_states[5][0]
        out.append((torch.nn.functional.normalize(h, dim=-1), enc["input_ids"][0]))
    (ce, cid), (re_, rid) = out
    sim = ce @ re_.T
    keep_c, keep_r = cid[1:-1], rid[1:-1]  # the special tokens carry weight 0
    p = float(sim[1:-1].max(1).values.mean())
    r = float(sim[:, 1:-1].max(0).values.mean())
    assert len(keep_c) and len(keep_r)
    assert got["precision"][0] == pytest.approx(p, abs=1e-5) and got["recall"][0] == pytest.approx(r, abs=1e-5)
    b = N.DISTILROBERTA_L5_BASELINE
    resc = N.BERTScorer(d, layer=5, baseline=b).score([cand], [ref])
    f = 2 * p * r / (p + r)
    assert resc["f1"][0] == pytest.approx((f - b[2]) / (1 - b[2]), abs=1e-5)
    assert N.DISTILBERT_L5_BASELINE == (0.6666034, 0.66660464, 0.66620487)


def test_distilroberta_baseline_ships_as_the_published_table(tmp_path):
    import hashlib

    # the constants rebuild bert_score's distilroberta-base.tsv byte for byte (its sha256 at the cited commit)
    text = N.baseline_tsv()
    assert hashlib.sha256(text.encode()).hexdigest() == N.DISTILROBERTA_BASELINE_TSV_SHA256
    (tmp_path / "b.tsv").write_text(text, encoding="utf-8")
    assert N.read_baseline(tmp_path / "b.tsv", 5) == N.DISTILROBERTA_L5_BASELINE == (0.84732, 0.84759504, 0.8473319)
    assert not any("baseline" in f.path for f in W.FILES)  # nothing unpinned is downloaded for it


def test_radcliq_v1_arithmetic_and_bleu2():
    rq = N.radcliq_v1(np.array([0.5]), np.array([0.4]), np.array([0.7]), np.array([0.3]))
    z = (np.array([0.5, 0.4, 0.7, 0.3]) - np.array(N.RADCLIQ_V1_MEAN)) / np.array(N.RADCLIQ_V1_SCALE)
    assert rq[0] == pytest.approx(float(z @ np.array(N.RADCLIQ_V1_COEF)) + N.RADCLIQ_V1_INTERCEPT)
    assert N.sentence_bleu2("a b c d", "a b c d") == pytest.approx(1.0)
    # hyp "a b x" vs ref "a b c d": p1 = 2/3, p2 = 1/2, BP = exp(1 - 4/3)
    assert N.sentence_bleu2("a b c d", "a b x") == pytest.approx(np.exp(1 - 4 / 3) * np.sqrt(2 / 3 * 1 / 2))
    assert N.sentence_bleu2("a b", "") == 0.0


# ------------------------------------------------------------------------------------------------ loading / keys
def test_chexbert_stand_in_loads_and_a_renamed_key_is_refused_by_name(weights_dir, tmp_path):
    m = N.CheXbert(weights_dir / "chexbert/chexbert.pth", weights_dir / "bert-base-uncased")
    labels = m.label(S.CORPUS[:2])
    assert len(labels) == 2 and set(labels[0]) >= {"No Finding", "Cardiomegaly"}
    assert m.embed(S.CORPUS[:2]).shape == (2, 32)
    ckpt = torch.load(weights_dir / "chexbert/chexbert.pth", weights_only=True)
    sd = ckpt["model_state_dict"]
    sd["module.linear_heads.99.weight"] = sd.pop("module.linear_heads.13.weight")
    bad = tmp_path / "chexbert.pth"
    torch.save(ckpt, bad)
    with pytest.raises(UserError) as exc:
        N.CheXbert(bad, weights_dir / "bert-base-uncased")
    assert "linear_heads.13.weight" in str(exc.value) and "linear_heads.99.weight" in str(exc.value)


def test_labeler_chexbert_path_writes_the_chexbert_convention_keys(weights_dir, tmp_path, capsys):
    from clinicalblip.metrics.conventions import convention_keys

    out = tmp_path / "m.json"
    assert cli.main(["eval", str(_preds(tmp_path)), "--out", str(out), "--skip-java-metrics", "--bootstrap", "0",
                     "--no-report", "--labeler", "chexbert",
                     "--chexbert-weights", str(weights_dir / "chexbert/chexbert.pth"),
                     "--chexbert-tokenizer", str(weights_dir / "bert-base-uncased")]) == 0
    m = json.loads(out.read_text())
    assert m["clinical"]["labeler"] == "chexbert" and all(isinstance(m[k], float) for k in convention_keys("chexbert"))


def test_radgraph_stand_in_annotates_and_key_mismatch_is_refused(weights_dir, tmp_path):
    arch = weights_dir / "radgraph/radgraph.tar.gz"
    rg = RadGraph(arch, encoder_dir_for(arch))
    long_report = " ".join(S.CORPUS * 3)  # longer than the 16-piece window: folded
    anns = rg.annotate([S.CORPUS[0], long_report])
    for a in anns:
        for e in a["entities"].values():
            assert set(e) == {"tokens", "label", "start_ix", "end_ix", "relations"}
            assert e["label"] in S.NER_LABELS[1:] and e["end_ix"] - e["start_ix"] < 4
            assert all(r[0] in S.REL_LABELS and r[1] in a["entities"] for r in e["relations"])
    assert any(e["relations"] for a in anns for e in a["entities"].values())
    state = S.radgraph_state()
    state["_ner._ner_scorers.radgraph__ner_labels.1._module.weight_renamed"] = state.pop(
        "_ner._ner_scorers.radgraph__ner_labels.1._module.weight")
    bad = S.write_radgraph_archive(tmp_path / "radgraph" / "radgraph.tar.gz", state=state)
    with pytest.raises(UserError) as exc:
        RadGraph(bad, encoder_dir_for(bad))
    assert "_ner._ner_scorers.radgraph__ner_labels.1._module.weight" in str(exc.value)
    assert "weight_renamed" in str(exc.value)


# ------------------------------------------------------------------------------------------------ the kit
def test_check_detects_a_changed_byte_and_a_missing_file(weights_dir, standin_files, tmp_path, capsys):
    d = tmp_path / "w"
    shutil.copytree(weights_dir, d)
    assert cli.main(["metrics", "check", str(d)]) == 0
    out = capsys.readouterr().out
    # without a project hash, SHA256SUMS (written at fetch) is what is checked
    assert "\nUNKNOWN" not in out and "project hash UNKNOWN" in out and f"{len(W.FILES)} verified" in out
    f = d / "distilbert-base-uncased" / "vocab.txt"
    data = bytearray(f.read_bytes())
    data[3] ^= 1
    f.write_bytes(bytes(data))
    (d / "radgraph" / "radgraph-xl.tar.gz").unlink()
    assert cli.main(["metrics", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT  distilbert-base-uncased/vocab.txt" in out
    assert "MISSING    radgraph/radgraph-xl.tar.gz" in out


def test_check_against_a_project_hash(weights_dir):
    f = "chexbert/chexbert.pth"
    good = W.WeightFile(f, "x/y", "chexbert.pth", sha256=W.sha256_file(weights_dir / f))
    bad = W.WeightFile(f, "x/y", "chexbert.pth", sha256="0" * 64)
    assert W.check(weights_dir, [good])["verified"] == [f]
    res = W.check(weights_dir, [bad])
    assert res["different"] == [f] and not res["ok"] and "project records" in res["lines"][0]
    nosums = W.WeightFile("bert-base-uncased/vocab.txt", "x/y", "vocab.txt")
    assert W.check(weights_dir / "radgraph", [nosums])["missing"] == ["bert-base-uncased/vocab.txt"]


def test_fetch_writes_every_file_sums_and_record_with_a_fake_hub(weights_dir, standin_files, tmp_path):
    asked = []

    def download(repo, filename, revision):
        asked.append(repo)
        match = [f for f in W.FILES if f.filename == filename and (f.repo == repo or f.repo.startswith("archive:"))]
        return weights_dir / match[0].path

    root = W.fetch(tmp_path / "fetched", download=download)
    assert W.check(root)["ok"] and len(W.check(root)["verified"]) == len(W.FILES)
    rec = json.loads((root / "fetch.json").read_text())
    # the encoder of each RadGraph archive is the one its config.json names
    assert "tiny/stand-in-bert" in asked and {r["path"] for r in rec["files"]} == {f.path for f in W.FILES}


def test_recorded_hashes_are_enforced_and_pins_are_recorded(weights_dir, tmp_path, capsys):
    byname = {f.path: f for f in W.FILES}
    cx = byname["chexbert/chexbert.pth"]
    assert cx.sha256 == "6550703c92d640e1e04d8105a7a185d76ece0f25fcbf033d292785bf22c0fde1"
    assert cx.revision == "6646433b3ad83a10f6e141db76d0ece44312b236"
    assert byname["radgraph/radgraph.tar.gz"].revision == "d97745aa136e5beb927da7e768e99de6ae807902"
    for f in W.FILES:  # a recorded value is a full hex digest / commit, never a placeholder
        assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0), f.path
        assert f.revision is None or (len(f.revision) == 40 and int(f.revision, 16) >= 0), f.path
    # the stand-ins are not the published files: check names each recorded-hash file DIFFERENT, not SHA256SUMS-OK
    assert cli.main(["metrics", "check", str(weights_dir)]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT  chexbert/chexbert.pth" in out and "project records 6550703c" in out
    assert "OK         distilbert-base-uncased/vocab.txt (project hash UNKNOWN" in out
    # fetch refuses a download whose sha256 differs from the recorded one, and asks for the pinned revision
    asked = []

    def download(repo, filename, revision):
        asked.append((repo, filename, revision))
        return weights_dir / byname["chexbert/chexbert.pth"].path

    with pytest.raises(UserError) as exc:
        W.fetch(tmp_path / "f", files=[cx], download=download)
    assert "chexbert.pth" in str(exc.value) and "differs" in str(exc.value)
    assert asked == [("StanfordAIMI/RRG_scorers", "chexbert.pth", "6646433b3ad83a10f6e141db76d0ece44312b236")]


def test_fetch_records_the_commit_a_hub_snapshot_resolved(weights_dir, tmp_path):
    src = weights_dir / "distilbert-base-uncased" / "vocab.txt"
    snap = tmp_path / "hub" / "models--x" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    shutil.copyfile(src, snap / "vocab.txt")
    wf = W.WeightFile("d/vocab.txt", "x/y", "vocab.txt")
    root = W.fetch(tmp_path / "f", files=[wf], download=lambda repo, filename, revision: snap / "vocab.txt")
    assert json.loads((root / "fetch.json").read_text())["files"][0]["revision"] == "ab" * 20


def test_eval_without_the_folder_names_the_missing_file_and_fetch(tmp_path, capsys):
    preds = _preds(tmp_path)
    rc = cli.main(["eval", str(preds), "--out", str(tmp_path / "m.json"), "--skip-java-metrics", "--bootstrap", "0",
                   "--labeler", "chexpert", "--metrics-dir", str(tmp_path / "nowhere"), "--metrics", "radgraph"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert str(tmp_path / "nowhere" / "radgraph" / "radgraph.tar.gz") in err
    assert "clinicalblip metrics fetch --to" in err
    assert cli.main(["eval", str(preds), "--out", str(tmp_path / "m.json"), "--metrics", "bogus",
                     "--metrics-dir", str(tmp_path)]) == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err


def test_eval_end_to_end_every_metric_in_json_report_viewer_and_compare(weights_dir, tmp_path, capsys):
    preds = _preds(tmp_path)
    out = tmp_path / "run" / "metrics.json"
    html = tmp_path / "run" / "cases.html"
    assert cli.main(["eval", str(preds), "--out", str(out), "--skip-java-metrics", "--bootstrap", "50",
                     "--labeler", "chexpert", "--metrics-dir", str(weights_dir), "--metrics",
                     "chexbert,rexrank", "--html", str(html), "--no-thumbnails"]) == 0
    capsys.readouterr()
    m = json.loads(out.read_text())
    for k in NEURAL_KEYS:
        assert isinstance(m[k], float), k
    assert m["radcliq_v1_inverse"] == pytest.approx(1 / m["radcliq_v1"])
    assert m["neural"]["parity_checked"] is False and "chexbert" in m["parity_not_checked"]
    assert "rules_micro14_upos" in m  # the rule labeler's conventions sit beside CheXbert's
    report = (out.parent / "report.md").read_text()
    assert "parity not checked" in report
    for k in NEURAL_KEYS:
        assert f"`{k}`" in report, k
    page = html.read_text()
    assert "parity not checked" in page and '"rg":' in page and '"cxb":' in page and "RadGraph F1" in page
    # compare: per-case statistics for the paired tests
    other = _preds(tmp_path, "other.jsonl", shift=2)
    res = cli.main(["compare", str(preds), str(other), "--out", str(tmp_path / "cmp.json"), "--resamples", "50",
                    "--skip-java-metrics", "--labeler", "chexpert", "--metrics-dir", str(weights_dir),
                    "--metrics", "chexbert,rexrank"])
    assert res == 0
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    block = cmp["comparisons"][0]["metrics"]
    for k in ("radgraph_partial", "bertscore_f1", "sembscore", "radcliq_v1", "chexbert_example_f1"):
        assert k in block and block[k]["a"] == pytest.approx(m[k]) and len(block[k]["ci95"]) == 2, k
    # CheXbert's and the rule labeler's corpus-level micro / macro F1 are resampled too (per-case TP / FP / FN)
    for k in ("chexbert_micro14_upos", "chexbert_macro5_uneg", "chexbert_micro5_upos", "rules_macro14_upos",
              "rules_micro5_uneg"):
        assert block[k]["a"] == m[k], k  # eval's number exactly
        assert block[k]["diff_from_statistics"] == pytest.approx(block[k]["diff"], abs=1e-12), k
        assert len(block[k]["ci95"]) == 2 and 0 < block[k]["p"] <= 1, k


FAKE_PACKAGES = {
    "bert_score/__init__.py": '''
import json, os
class BERTScorer:
    def __init__(self, **kw):
        import hashlib
        # the driver hands bert_score the published distilroberta-base table (written from the shipped constants)
        assert hashlib.sha256(open(kw["baseline_path"], "rb").read()).hexdigest() == (
            "208d5b2547bc41a1dbfb110f665c4ce38f0b90f7ce1d5c5fa30a25a4d779e1b4")
    def score(self, hyps, refs):
        v = json.load(open(os.environ["FAKE_REF"]))["bertscore_f1"]
        return v, v, v
''',
    "radgraph/__init__.py": '''
import json, os
class F1RadGraph:
    def __init__(self, **kw): pass
    def __call__(self, hyps, refs):
        v = json.load(open(os.environ["FAKE_REF"]))
        return None, (v["radgraph_simple"], v["radgraph_partial"], v["radgraph_complete"]), None, None
''',
}


def test_parity_passes_writes_its_record_and_lifts_the_flag(weights_dir, tmp_path, capsys):
    d = tmp_path / "w"
    shutil.copytree(weights_dir, d)
    preds = _preds(tmp_path)
    from clinicalblip.metrics.neural_eval import score_neural

    recs = [json.loads(line) for line in preds.read_text().splitlines()]
    _, ours = score_neural([r["reference"] for r in recs], [r["prediction"] for r in recs], d,
                           ["bertscore", "radgraph"])
    pkgs = tmp_path / "pkgs"
    for rel, code in FAKE_PACKAGES.items():
        (pkgs / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkgs / rel).write_text(code)
    ref = {k: ours[k] for k in ("bertscore_f1", "radgraph_simple", "radgraph_partial", "radgraph_complete")}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    py = tmp_path / "refpy"
    py.write_text(f"#!/bin/sh\nFAKE_REF={tmp_path / 'ref.json'} PYTHONPATH={pkgs} exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    assert cli.main(["metrics", "parity", "--reference-python", str(py), "--reports", str(preds),
                     "--metrics-dir", str(d), "--metrics", "bertscore,radgraph"]) == 0
    assert "parity passed" in capsys.readouterr().out
    assert json.loads((d / "parity.json").read_text())["passed"] is True
    assert W.parity_status(d)["checked"] is True
    out = tmp_path / "m.json"
    assert cli.main(["eval", str(preds), "--out", str(out), "--skip-java-metrics", "--bootstrap", "0",
                     "--labeler", "chexpert", "--metrics-dir", str(d), "--metrics", "radgraph", "--no-report"]) == 0
    m = json.loads(out.read_text())
    assert m["neural"]["parity_checked"] is True and "parity_not_checked" not in m
    # a reference that differs beyond the tolerance fails and says so
    ref["bertscore_f1"] = [v + 0.01 for v in ref["bertscore_f1"]]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert cli.main(["metrics", "parity", "--reference-python", str(py), "--reports", str(preds),
                     "--metrics-dir", str(d), "--metrics", "bertscore,radgraph"]) == 1
    assert "bertscore_f1" in capsys.readouterr().out and W.parity_status(d)["checked"] is False


def test_named_metric_for_training_selection(weights_dir):
    from clinicalblip.metrics.neural_eval import metric_for_key, named_metric

    assert metric_for_key("rules_micro5_upos") is None and metric_for_key("radgraph_partial") == "radgraph"
    assert metric_for_key("bertscore_radeval_f1") == "bertscore-radeval" and metric_for_key("sembscore") == "sembscore"
    for bad in ("radgraph_f1", "bleu", "chexbert_micro7_upos"):
        with pytest.raises(UserError, match="unknown clinical metric"):
            metric_for_key(bad)
    refs, preds = S.CORPUS, S.CORPUS[::-1]
    arch = weights_dir / "radgraph/radgraph.tar.gz"
    rg = RadGraph(arch, encoder_dir_for(arch))
    by_hand = np.mean([reward(h, r, "partial") for h, r in zip(rg.annotate(preds), rg.annotate(refs))])
    assert named_metric("radgraph_partial", refs, preds, weights_dir) == pytest.approx(float(by_hand))
    with pytest.raises(UserError, match="metrics fetch"):
        named_metric("bertscore_f1", refs, preds, None)


# ------------------------------------------------------------------------------------------------ real weights
REAL = os.environ.get("CLINICALBLIP_METRICS_DIR")


@pytest.mark.skipif(not REAL or not Path(REAL).is_dir(), reason="CLINICALBLIP_METRICS_DIR not set")
def test_real_weights_check_and_sane_scores():
    assert W.check(REAL)["ok"]
    from clinicalblip.metrics.neural_eval import score_neural

    refs = ["No pleural effusion or pneumothorax. Heart size is normal.", "Moderate cardiomegaly."]
    summary, per_case = score_neural(refs, refs, REAL, W.parse_metrics("chexbert,rexrank"))
    assert summary["radgraph_partial"] == pytest.approx(1.0) and summary["bertscore_f1"] == pytest.approx(1.0, 1e-3)
    assert summary["sembscore"] == pytest.approx(1.0, abs=1e-4) and summary["chexbert_example_f1"] >= 0.5
    lab = N.CheXbert(Path(REAL) / "chexbert/chexbert.pth", Path(REAL) / "bert-base-uncased").label(
        ["Moderate cardiomegaly."])[0]
    assert lab["Cardiomegaly"] == 1


def _viewer_data(html: Path) -> dict:
    import re

    m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', html.read_text(), re.S)
    return json.loads(m.group(1))


def test_view_with_the_weights_folder_shows_what_eval_html_shows(weights_dir, tmp_path, capsys):
    preds = _preds(tmp_path)
    common = ["--skip-java-metrics", "--bootstrap", "0", "--labeler", "chexpert", "--no-thumbnails"]
    ev = tmp_path / "eval.html"
    assert cli.main(["eval", str(preds), "--out", str(tmp_path / "m.json"), "--no-report", *common,
                     "--metrics-dir", str(weights_dir), "--metrics", "chexbert,radgraph", "--html", str(ev)]) == 0
    vw = tmp_path / "view.html"
    assert cli.main(["view", str(preds), "--out", str(vw), *common, "--metrics-dir", str(weights_dir),
                     "--metrics", "chexbert,radgraph"]) == 0
    a, b = _viewer_data(ev)["cases"], _viewer_data(vw)["cases"]
    assert len(a) == len(b) == len(S.CORPUS)
    for ca, cb in zip(a, b):
        assert "rg" in cb["s"] and "cxb" in cb["s"]
        assert (cb["s"]["rg"], cb["s"]["cxb"]) == (ca["s"]["rg"], ca["s"]["cxb"])
    assert len({c["s"]["rg"] for c in b}) > 1  # per-case values, not one number repeated
    # a metrics.json summary goes with --metrics-json; the neural per-case values still come from the folder
    vj = tmp_path / "view_json.html"
    assert cli.main(["view", str(preds), "--out", str(vj), *common, "--metrics-json", str(tmp_path / "m.json"),
                     "--metrics-dir", str(weights_dir), "--metrics", "radgraph"]) == 0
    cj = _viewer_data(vj)["cases"]
    assert [c["s"]["rg"] for c in cj] == [c["s"]["rg"] for c in a] and "cxb" not in cj[0]["s"]
    # without the folder the page has no neural values, and neural names without it are one clear line
    plain = tmp_path / "plain.html"
    assert cli.main(["view", str(preds), "--out", str(plain), *common]) == 0
    assert "rg" not in _viewer_data(plain)["cases"][0]["s"]
    capsys.readouterr()
    assert cli.main(["view", str(preds), "--out", str(plain), *common, "--metrics", "radgraph"]) == 2
    err = capsys.readouterr().err
    assert "needs --metrics-dir DIR" in err and err.count("\n") == 1
    assert cli.main(["view", str(preds), "--out", str(plain), *common, "--metrics-dir", str(weights_dir)]) == 2
    assert "--metrics-dir needs --metrics NAMES" in capsys.readouterr().err
    assert cli.main(["view", str(preds), "--out", str(plain), *common, "--metrics-dir", str(weights_dir),
                     "--metrics", str(tmp_path / "m.json")]) == 2
    assert f"--metrics-json {tmp_path / 'm.json'}" in capsys.readouterr().err
