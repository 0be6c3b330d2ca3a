"""The prior study (issue 21): linking, data check, the synthetic course of findings, collation, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinicalblip.data.check import check_manifest, check_records
from clinicalblip.data.manifest import read_manifest, write_manifest
from clinicalblip.data.priors import link_priors, prior_parts, prior_problems, prior_report_text
from clinicalblip.errors import UserError


def _img(path: Path, value: int = 100) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return str(path)


def _rec(rid, pid="p1", split="train", date=None, prior_id=None, **kw):
    r = {"id": rid, "patient_id": pid, "split": split, "images": [{"path": f"{rid}.png", "view": "PA"}],
         "findings": f"findings of {rid}.", "impression": "Impression."}
    if date:
        r["study_date"] = date
    if prior_id:
        r["prior_id"] = prior_id
    r.update(kw)
    return r


# ------------------------------------------------------------------------------------------------ linking
def test_read_manifest_links_prior_id_across_the_split_filter_and_resolves_paths(tmp_path):
    recs = [_rec("a", date="2020-01-01"), _rec("b", date="2020-03-01", prior_id="a"),
            _rec("c", pid="p2", prior=None, date="2020-01-01"),
            _rec("d", pid="p3", prior={"images": [{"path": "old/d0.png", "view": "PA"}],
                                       "findings": "Small left pleural effusion.", "study_date": "2019-12-01"},
                 study_date="2020-01-31")]
    m = tmp_path / "m.jsonl"
    write_manifest(recs, m)
    by = {r["id"]: r for r in read_manifest(m)}
    assert by["b"]["prior"]["id"] == "a" and by["b"]["prior"]["findings"] == "findings of a."
    assert by["b"]["prior"]["images"][0]["path"] == str(tmp_path / "a.png")  # resolved like the study's own
    assert by["a"].get("prior") is None and by["c"].get("prior") is None
    assert by["d"]["prior"]["images"][0]["path"] == str(tmp_path / "old" / "d0.png")
    assert prior_report_text(by["b"]) == "(60 days earlier) findings of a."
    assert prior_report_text(by["d"]) == "(61 days earlier) Small left pleural effusion."
    # one split only: the link is still made (linking happens before the split filter)
    (test_b,) = [r for r in read_manifest(m, split="train") if r["id"] == "b"]
    assert test_b["prior"]["id"] == "a"


@pytest.mark.parametrize("case,code", [
    ("missing", "prior_missing"), ("other_patient", "prior_other_patient"), ("later", "prior_later"),
    ("other_split", "prior_other_split"), ("cycle", "prior_cycle"), ("self", "prior_cycle"),
    ("bad_embedded", "prior_bad"), ("embedded_later", "prior_later"),
])
def test_data_check_names_each_broken_prior_link(tmp_path, case, code):
    recs = [_rec("a", date="2020-01-01"), _rec("b", date="2020-02-01", prior_id="a")]
    if case == "missing":
        recs[1]["prior_id"] = "zzz"
    elif case == "other_patient":
        recs[0]["patient_id"] = "p9"
    elif case == "later":
        recs[0]["study_date"] = "2020-05-01"
    elif case == "other_split":
        recs[0]["split"] = "test"
    elif case == "cycle":
        recs[0]["prior_id"] = "b"
    elif case == "self":
        recs[1]["prior_id"] = "b"
    elif case == "bad_embedded":
        recs[1].pop("prior_id")
        recs[1]["prior"] = {"study_date": "2019-01-01"}
    elif case == "embedded_later":
        recs[1].pop("prior_id")
        recs[1]["prior"] = {"findings": "x", "study_date": "2021-01-01"}
    for r in recs:
        _img(tmp_path / f"{r['id']}.png")
    m = tmp_path / "m.jsonl"
    write_manifest(recs, m)
    report = check_manifest(m)
    assert not report.ok
    bad = report.bad()
    assert "b" in bad and any(p.startswith(code + ":") for p in bad["b"]), bad
    assert code in report.format()  # data check prints the code with the record id
    assert "b" in report.format()


def test_data_check_accepts_good_links_and_checks_embedded_prior_images(tmp_path):
    recs = [_rec("a", date="2020-01-01"), _rec("b", date="2020-02-01", prior_id="a"),
            _rec("c", pid="p2", prior={"images": [{"path": "gone.png", "view": "PA"}], "findings": "x"})]
    for r in recs:
        _img(tmp_path / f"{r['id']}.png")
    m = tmp_path / "m.jsonl"
    write_manifest(recs, m)
    bad = check_manifest(m).bad()
    assert set(bad) == {"c"} and any(p.startswith("missing_image") for p in bad["c"])


def test_prior_problems_on_a_clean_chain_is_empty():
    recs = [_rec("a", date="2020-01-01"), _rec("b", date="2020-02-01", prior_id="a"),
            _rec("c", date="2020-02-01", prior_id="b")]  # same day: allowed (ordered by time upstream)
    assert prior_problems(recs) == [[], [], []]


def test_prior_dropout_never_withholds_both_parts():
    seen = {prior_parts("both", 0.6, seed=0, epoch=e, rid=str(i)) for e in range(3) for i in range(300)}
    assert seen == {(True, True), (False, True), (True, False)}
    assert prior_parts("report", 0.9, rid="x") == (True, False)
    assert prior_parts("none", 0.0) == (False, False)


# ------------------------------------------------------------------------------------------------ synthetic
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from clinicalblip.data.synth import write_synthetic_dataset

    m = write_synthetic_dataset(tmp_path_factory.mktemp("synthp"), n=400, seed=5)
    return [json.loads(line) for line in m.read_text().splitlines()], m


def test_synthetic_patients_have_one_to_four_studies_linked_in_time(synth):
    recs, m = synth
    by = {r["id"]: r for r in recs}
    per_patient: dict[str, list] = {}
    for r in recs:
        per_patient.setdefault(r["patient_id"], []).append(r)
    sizes = {len(v) for v in per_patient.values()}
    assert sizes == {1, 2, 3, 4}
    for studies in per_patient.values():
        assert "prior_id" not in studies[0] and "change" not in studies[0]
        for prev, cur in zip(studies, studies[1:]):
            assert cur["prior_id"] == prev["id"] and cur["split"] == prev["split"]
            assert cur["study_date"] > prev["study_date"] and cur["interval_days"] >= 14
    assert check_manifest(m).ok
    # the change of every finding is consistent with the labels of the two studies
    for r in recs:
        if "prior_id" not in r:
            continue
        p = by[r["prior_id"]]["labels"]
        for f, c in r["change"].items():
            assert (p[f], r["labels"][f]) == {"new": (0, 1), "resolved": (1, 0)}.get(c, (1, 1))
        for f in r["labels"]:
            if p[f] or r["labels"][f]:
                assert f in r["change"]
    kinds = {c for r in recs for c in (r.get("change") or {}).values()}
    assert kinds == {"new", "worse", "better", "unchanged", "resolved"}


def test_synthetic_reports_describe_change_only_against_a_prior(synth):
    from clinicalblip.data.synth import label_report
    from clinicalblip.metrics.change import change_labels, invented_comparison

    recs, _ = synth
    for r in recs:
        assert label_report(r["findings"]) == r["labels"], r["findings"]
        assert change_labels(r["findings"]) == (r.get("change") or {}), r["findings"]
        if "prior_id" not in r:
            assert not invented_comparison(r["findings"]) and not invented_comparison(r["impression"]), r["findings"]
            assert r["comparison"] in (None, "None.")


def test_synthetic_change_is_drawn_and_keeps_its_place(synth):
    """A finding that persists keeps its side; one that grows is drawn bigger (more changed pixels)."""
    from clinicalblip.data.synth import evolve_details, level_of, render_study, sample_details

    rng = np.random.default_rng(0)
    labels = {"cardiomegaly": 0, "pleural_effusion": 1, "pneumothorax": 0, "consolidation": 0, "nodule": 0}
    prior = sample_details(labels, [], np.random.default_rng(1))
    prior["pleural_effusion"].update(side="left", size="small", height=0.12, alpha=1.0)
    grown = evolve_details(sample_details(labels, [], np.random.default_rng(2)), prior,
                           {"pleural_effusion": "worse"}, rng)
    assert grown["pleural_effusion"]["side"] == "left" and level_of("pleural_effusion", grown["pleural_effusion"]) == 1
    none = dict(labels, pleural_effusion=0)

    def diff(details):
        a, _ = render_study(labels, np.random.default_rng(9), 64, details=details)
        b, _ = render_study(none, np.random.default_rng(9), 64, details=details)
        return int((np.abs(np.asarray(a, float) - np.asarray(b, float)) > 8).sum())

    assert diff(grown) > diff(prior) > 0


# ------------------------------------------------------------------------------------------------ collation
@pytest.fixture(scope="module")
def processor():
    from clinicalblip.tiny import build_tiny_processor

    return build_tiny_processor("tiny")


def _collator(processor, prior="both", **kw):
    from clinicalblip.data.collate import StudyCollator
    from clinicalblip.prompts import load_template

    return StudyCollator(processor=processor, template=load_template("findings_with_context"),
                         num_query_tokens=processor.num_query_tokens, mode="train", prior=prior, **kw)


def _prior_records(tmp_path):
    cur = [{"path": _img(tmp_path / "f.png"), "view": "PA"}, {"path": _img(tmp_path / "l.png"), "view": "LATERAL"}]
    old = [{"path": _img(tmp_path / "pl.png", 30), "view": "LATERAL"}, {"path": _img(tmp_path / "pf.png", 60), "view": "PA"}]
    with_prior = {"id": "s2", "images": cur, "indication": "Dyspnea.", "findings": "Increased left pleural effusion.",
                  "interval_days": 30, "prior": {"images": old, "findings": "Small left pleural effusion."}}
    without = {"id": "s1", "images": cur[:1], "indication": "Dyspnea.", "findings": "No pleural effusion."}
    return with_prior, without


def test_collation_adds_prior_image_blocks_and_counts_their_tokens(processor, tmp_path):
    with_prior, without = _prior_records(tmp_path)
    nq = processor.num_query_tokens
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    batch = _collator(processor)([with_prior, without])
    assert batch["pixel_values"].shape[0] == 3 + 1  # 2 views + the prior's frontal, then 1 view
    assert batch["qformer_input_ids"].shape[0] == 4
    counts = (batch["input_ids"] == image_id).sum(1).tolist()
    assert counts == [3 * nq, 1 * nq]
    p0, p1 = batch["prompts"]
    assert "Views: PA, LATERAL, prior PA" in p0 and "Prior report: (30 days earlier) Small left pleural effusion." in p0
    assert "prior" not in p1.lower()
    # the prior frontal (value 60) is the third block, not the prior lateral (30)
    third = batch["pixel_values"][2]
    only_views = _collator(processor, prior="none")([with_prior])
    assert only_views["pixel_values"].shape[0] == 2 and not torch_equal(third, only_views["pixel_values"][1])
    both_views = _collator(processor, max_prior_views=2)([with_prior])
    assert both_views["pixel_values"].shape[0] == 4 and "prior PA, prior LATERAL" in both_views["prompts"][0]
    # report only / images only
    rep = _collator(processor, prior="report")([with_prior])
    assert rep["pixel_values"].shape[0] == 2 and "Prior report:" in rep["prompts"][0]
    img = _collator(processor, prior="images")([with_prior])
    assert img["pixel_values"].shape[0] == 3 and "Prior report:" not in img["prompts"][0]


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_the_prior_report_is_shortened_before_every_other_slot(processor, tmp_path):
    with_prior, _ = _prior_records(tmp_path)
    with_prior["prior"]["findings"] = " ".join(["effusion"] * 400)
    with_prior["history"] = "History of heart failure."
    col = _collator(processor, max_prompt_tokens=90)
    batch = col([with_prior])
    prompt = batch["prompts"][0]
    assert "History: History of heart failure." in prompt and "Indication: Dyspnea." in prompt
    assert "Prior report: (30 days earlier) effusion" in prompt and prompt.count("effusion") < 400
    assert "s2" in col.shortened


def test_a_template_without_the_prior_slot_is_refused_for_the_prior_report(processor):
    from clinicalblip.data.collate import StudyCollator
    from clinicalblip.prompts import load_template

    tpl = load_template("findings_no_context")
    with pytest.raises(UserError, match=r"data.prior=both .*\{prior\} slot"):
        StudyCollator(processor=processor, template=tpl, num_query_tokens=processor.num_query_tokens, prior="both")
    StudyCollator(processor=processor, template=tpl, num_query_tokens=processor.num_query_tokens, prior="images")


# ------------------------------------------------------------------------------------------------ refusals
def test_prior_input_is_refused_when_the_model_does_not_take_it():
    from clinicalblip.priorinput import attach_prior, prior_mode_for

    assert prior_mode_for("both", None) == "both" and prior_mode_for("both", "report") == "report"
    assert prior_mode_for("none", "none") == "none"
    with pytest.raises(UserError, match="data.prior=none"):
        prior_mode_for("none", "images")
    with pytest.raises(UserError, match="data.prior=report: it does not take the prior's images"):
        prior_mode_for("report", "both")
    with pytest.raises(UserError, match=r"data.prior=none: it takes no a prior image \(--prior-image\)|"
                                        r"data.prior=none: it takes no prior image"):
        attach_prior({}, {"images": ["x.png"]}, "none")
    with pytest.raises(UserError, match=r"data.prior=images: .*--prior-report"):
        attach_prior({}, {"report": "Stable."}, "images")
    with pytest.raises(UserError, match="not a date"):
        attach_prior({}, {"report": "Stable.", "study_date": "yesterday"}, "both")
    rec = attach_prior({}, {"images": ["a.png"], "report": "Stable.", "study_date": "2020-01-01"}, "both")
    assert rec["prior"] == {"images": [{"path": "a.png", "view": "PA"}], "findings": "Stable.",
                            "study_date": "2020-01-01"}


def test_link_priors_counts_and_ignores_unknown_ids():
    recs = [_rec("a"), _rec("b", prior_id="a"), _rec("c", prior_id="nope")]
    assert link_priors(recs) == 1 and "prior" not in recs[2]
    ps = check_records(recs, check_images="none")
    assert [p.code for p in ps.problems[2]] == ["prior_missing"]


# ------------------------------------------------------------------------------------------------ adapters
def test_mimic_links_each_study_to_the_subjects_latest_earlier_one(tmp_path):
    import csv

    from clinicalblip.data.mimic_cxr import prepare_mimic_cxr
    from clinicalblip.data.prepare import format_summary

    # subject 1: s11 on day 1; s12 and s13 on day 2 (s13 at 08:05, s12 at 14:30); s14 without a date
    # subject 2: s21 alone; subject 3: s31 (train) and s32 (test: its prior would be in another split)
    studies = [("d11", "11", "1", "train", "20150101", "101500"), ("d12", "12", "1", "train", "20150102", "143000"),
               ("d13", "13", "1", "train", "20150102", "80500.25"), ("d14", "14", "1", "train", "", ""),
               ("d21", "21", "2", "validate", "20160101", "90000"), ("d31", "31", "3", "train", "20170101", "1"),
               ("d32", "32", "3", "test", "20170301", "1")]
    with open(tmp_path / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        w.writerows([(d, s, p, sp) for d, s, p, sp, _, _ in studies])
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
        w.writerows([(d, p, s, "PA", date, time) for d, s, p, _, date, time in studies])
    out = tmp_path / "m.jsonl"
    summary = prepare_mimic_cxr(out, split_csv=tmp_path / "split.csv", metadata=tmp_path / "meta.csv")
    by = {r["id"]: r for r in read_manifest(out)}
    assert by["s13"]["prior_id"] == "s11" and by["s12"]["prior_id"] == "s13"  # same day: ordered by time
    assert "prior_id" not in by["s11"] and "prior_id" not in by["s14"] and "prior_id" not in by["s21"]
    assert "prior_id" not in by["s32"]
    assert by["s12"]["study_date"] == "2015-01-02" and "study_date" not in by["s14"]
    assert by["s12"]["prior"]["id"] == "s13"  # linked on reading
    assert summary["studies_with_prior"] == 2 and summary["studies_without_date"].startswith("1 ")
    assert summary["priors_in_another_split_not_linked"] == 1
    text = format_summary(summary)
    assert text.count("without date") == 1  # said once, with the count
    assert not [p for p in prior_problems(read_manifest(out)) if p]


def test_jsonl_export_keeps_prior_id(tmp_path):
    from clinicalblip.data.tabular import prepare_table

    rows = [{"id": "a", "patient_id": "p", "split": "train", "images": ["a.png"], "findings": "x",
             "study_date": "2020-01-01"},
            {"id": "b", "patient_id": "p", "split": "train", "images": ["b.png"], "findings": "y",
             "prior_id": "a", "study_date": "2020-02-01"}]
    src = tmp_path / "export.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "m.jsonl"
    prepare_table(src, out)
    by = {r["id"]: r for r in read_manifest(out)}
    assert by["b"]["prior_id"] == "a" and by["b"]["prior"]["findings"] == "x"


# ------------------------------------------------------------------------------------------------ the model side
def test_stage_and_release_record_the_prior_and_generation_refuses_a_mismatch(stage1_dir, synth_manifest, tmp_path):
    import dataclasses

    import yaml

    from clinicalblip.generate import ReportModel, generate_split
    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.release import read_release

    cfg = yaml.safe_load((stage1_dir / "config.yaml").read_text())
    assert cfg["data"]["prior"] == "both" and cfg["data"]["max_prior_views"] == 1
    release = tmp_path / "release"
    merge_stage_chain(str(stage1_dir), str(release))
    assert read_release(release)["prior"] == "both" and read_release(release)["max_prior_views"] == 1
    rm = ReportModel.load(str(release))
    assert rm.prior == "both"
    (rec,) = [r for r in read_manifest(synth_manifest, split="train") if isinstance(r.get("prior"), dict)][:1]
    imgs = [im["path"] for im in rec["images"]]
    prior = {"images": [rec["prior"]["images"][0]["path"]], "report": "Small left pleural effusion."}
    out = rm.report(imgs, max_new_tokens=2, prior=prior)
    assert out["prior"] == "both" and "prior PA" in out["prompt"] and "Prior report: Small left" in out["prompt"]
    assert rm.report(imgs, max_new_tokens=2)["prior"] is None
    # a model trained without priors refuses a prior image, naming the setting
    plain = dataclasses.replace(rm, prior="none")
    with pytest.raises(UserError, match=r"data.prior=none.*prior image \(--prior-image\)"):
        plain.report(imgs, max_new_tokens=2, prior=prior)
    with pytest.raises(UserError, match=r"data.prior=report.*--prior-image"):
        dataclasses.replace(rm, prior="report").report(imgs, max_new_tokens=2, prior={"images": prior["images"]})
    # manifest mode: the prior ablations write what the prompt showed
    out_file = tmp_path / "p.jsonl"
    generate_split(str(release), str(synth_manifest), "train", str(out_file), max_new_tokens=2, limit=6,
                   num_workers=0, prior="report")
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["prior_shown"] for r in rows if r["has_prior"]} == {"report"}
    assert {r["prior_shown"] for r in rows if not r["has_prior"]} <= {"none"}
    assert json.loads((tmp_path / "p.jsonl.meta.json").read_text())["prior"] == "report"


def test_generate_cli_single_study_prior_flags(stage1_dir, synth_manifest, tmp_path, capsys):
    from clinicalblip.cli import main

    (rec,) = [r for r in read_manifest(synth_manifest) if isinstance(r.get("prior"), dict)][:1]
    args = ["generate", str(stage1_dir), "--image", rec["images"][0]["path"], "--max-new-tokens", "2", "--json",
            "--prior-image", rec["prior"]["images"][0]["path"], "--prior-report", "Stable cardiomegaly.",
            "--prior-date", "2020-01-01", "--study-date", "2020-01-31"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Prior report: (30 days earlier) Stable cardiomegaly." in out["prompt"] and out["prior"] == "both"
    assert main(["generate", str(stage1_dir), "--image", rec["images"][0]["path"], "--prior-date", "2020-01-01"]) == 2
    assert "--prior-date needs the prior itself" in capsys.readouterr().err


def test_generation_with_a_template_without_the_prior_slot_keeps_only_the_prior_images(processor, tmp_path):
    from clinicalblip.data.collate import StudyCollator
    from clinicalblip.prompts import load_template

    col = StudyCollator(processor=processor, template=load_template("findings_no_context"),
                        num_query_tokens=processor.num_query_tokens, mode="generate", prior="both")
    assert col.prior == "images"
    with_prior, _ = _prior_records(tmp_path)
    assert col([with_prior])["pixel_values"].shape[0] == 3
