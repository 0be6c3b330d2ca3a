"""Issue 24 items 7-8: the model is asked at inference exactly as it was trained, and every inference path
(`generate --image`, /v1/reports, ReportModel.report) checks a study the same way."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import dx_dataset  # noqa: E402

from clinicalblip import cli  # noqa: E402
from clinicalblip import generate as G  # noqa: E402
from clinicalblip.data.collate import IGNORE_INDEX, StudyCollator  # noqa: E402
from clinicalblip.generate import ReportModel  # noqa: E402
from clinicalblip.model import build_base  # noqa: E402
from clinicalblip.prompts import load_template  # noqa: E402
from clinicalblip.serve.app import create_app  # noqa: E402
from clinicalblip.serve.engine import ReportService  # noqa: E402

# (views in the order given, manifest context, the same context as typed on the command line / in the form)
CASES = {
    "bare": (None, {}, {}),
    "views": (["LATERAL", "PA"], {}, {}),  # lateral first: every path must put the frontal first, as training does
    "age_sex_hints": (None, {"age": 63, "sex": "F", "hints": ["effusion", "pneumothorax"]},
                      {"age": "63", "sex": "F", "hints": "effusion,pneumothorax"}),
    "everything": (["LATERAL", "PA"],
                   {"indication": "Dyspnea.  Rule out  effusion.", "history": "CHF.", "comparison": "None.",
                    "age": 71, "sex": "M", "hints": "cardiomegaly, edema"},
                   {"indication": "Dyspnea.  Rule out  effusion.", "history": "CHF.", "comparison": "None.",
                    "age": "71", "sex": "M", "hints": "cardiomegaly, edema"}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("lateral.png", "frontal.png"):
        p = d / name
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    dcm = d / "lateral.dcm"
    ds = dx_dataset((rng.random((64, 64)) * 4095).astype(np.uint16), 12, ViewPosition="LL")
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.save_as(dcm, enforce_file_format=True)
    return paths, str(dcm)


@pytest.fixture(scope="module", params=[("tiny", "findings_with_context"),
                                        ("tiny-t5", "findings_impression_with_context")], ids=["llama", "t5"])
def rm(request, tmp_path_factory):
    base, template = request.param
    model, processor = build_base(base)
    return ReportModel(model=model.eval(), processor=processor, template=load_template(template),
                       model_dir=str(tmp_path_factory.mktemp(base)), max_new_tokens=2)


def _capture(rm, monkeypatch) -> list:
    """Record the batches the model is given (and skip the decoding: only the prompt matters here)."""
    seen = []

    def fake(batch, **kw):
        seen.append(batch)
        return ["report"] * len(batch["input_ids"])

    monkeypatch.setattr(rm, "generate_batch", fake)
    return seen


def _prompt_ids(batch) -> list[int]:
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    labels = batch.get("labels")
    if labels is not None and labels.shape == batch["input_ids"].shape:  # decoder-only training: prompt + report
        return ids[(labels[0] == IGNORE_INDEX) & (mask == 1)].tolist()
    return ids[mask == 1].tolist()  # generation, and encoder-decoder training: the input is all prompt


def _qformer_ids(batch) -> list[list[int]]:
    return [row[m == 1].tolist() for row, m in zip(batch["qformer_input_ids"], batch["qformer_attention_mask"])]


def _training_batch(rm, paths, views, context):
    rec = {"id": "s1", "images": [{"path": p, "view": v} for p, v in zip(paths, views or [None] * len(paths))],
           "findings": "The heart is normal.", "impression": "Normal.", **context}
    collate = StudyCollator(processor=rm.processor, template=rm.template,
                            num_query_tokens=rm.processor.num_query_tokens, decoder_only=rm.decoder_only,
                            mode="train", max_views=rm.max_views, max_prompt_tokens=rm.max_prompt_tokens)
    return collate([rec])


@pytest.mark.parametrize("case", list(CASES))
def test_cli_api_and_training_prompts_are_byte_identical(case, rm, images, monkeypatch, capsys):
    views, manifest_ctx, typed_ctx = CASES[case]
    paths = images[0]
    train = _training_batch(rm, paths, views, manifest_ctx)
    seen = _capture(rm, monkeypatch)

    # the CLI: generate --image ... --view ... --age ... (the model load replaced by the one built here)
    monkeypatch.setattr(G.ReportModel, "load", classmethod(lambda cls, *a, **k: rm))
    argv = ["generate", rm.model_dir, "--json"]
    for i, p in enumerate(paths):
        argv += ["--image", p] + (["--view", views[i]] if views else [])
    for k, v in typed_ctx.items():
        argv += [f"--{k}", v]
    assert cli.main(argv) == 0
    cli_out = json.loads(capsys.readouterr().out)
    cli_batch = seen.pop()

    # the API: /v1/reports with the same study (the page sends the same form)
    service = ReportService(rm)
    files = [("images", (f"v{i}.png", open(p, "rb").read(), "image/png")) for i, p in enumerate(paths)]
    data = dict(typed_ctx)
    if views:
        data["views"] = views
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/reports", files=files, data=data)
    assert r.status_code == 200, r.text
    api_batch = seen.pop()

    # the library call
    lib = rm.report(paths, views=views, **typed_ctx)
    lib_batch = seen.pop()

    expected = train["prompts"][0]
    assert cli_out["prompt"] == r.json()["prompt"] == lib["prompt"] == expected
    for b in (cli_batch, api_batch, lib_batch):
        assert _prompt_ids(b) == _prompt_ids(train)
        assert _qformer_ids(b) == _qformer_ids(train)
        assert torch.equal(b["pixel_values"], train["pixel_values"])  # frontal first everywhere
    if views:
        assert "Views: PA, LATERAL" in expected
    for k, v in typed_ctx.items():
        if k in rm.template.slots:
            assert (", ".join(x.strip() for x in v.split(",")) if k == "hints" else " ".join(v.split())) in expected


def test_dicom_view_position_is_the_default_view(rm, images, monkeypatch, capsys):
    png_frontal, dcm = images[0][1], images[1]
    seen = _capture(rm, monkeypatch)
    monkeypatch.setattr(G.ReportModel, "load", classmethod(lambda cls, *a, **k: rm))
    assert cli.main(["generate", rm.model_dir, "--json", "--image", dcm, "--image", png_frontal,
                     "--view", "", "--view", "PA"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Views: PA, LATERAL" in out["prompt"]  # LL from the DICOM header, canonical as in manifests
    with TestClient(create_app(ReportService(rm))) as client:
        r = client.post("/v1/reports", data={"views": ["", "PA"]},
                        files=[("images", ("a.dcm", open(dcm, "rb").read(), "application/dicom")),
                               ("images", ("b.png", open(png_frontal, "rb").read(), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == out["prompt"] and r.json()["views"] == ["PA", "LATERAL"]
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------- item 8
CLI_REFUSALS = [
    (["--image", "A", "--image", "A", "--image", "A"], "--image: 3 images given; this model takes at most 2 views"),
    (["--image", "A", "--temperature", "0.7"], "--temperature: only applies with --sample"),
    (["--image", "A", "--top-p", "0.9"], "--top-p: only applies with --sample"),
    (["--image", "A", "--sample", "--num-beams", "3"], "--num-beams: beam search and sampling do not combine"),
    (["--image", "A", "--num-beams", "0"], "--num-beams: 0 is out of range [1, inf)"),
    (["--image", "A", "--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
    (["--image", "A", "--sample", "--temperature", "-1"], "--temperature: -1.0 is out of range (0.0, 5.0]"),
    (["--image", "A", "--image", "A", "--view", "PA"], "--view: 1 view(s) for 2 image(s)"),
    (["--manifest", "M", "--out", "P", "--num-beams", "0"], "--num-beams: 0 is out of range"),
]


@pytest.mark.parametrize("extra,message", CLI_REFUSALS)
def test_cli_refuses_what_the_server_refuses_before_loading(extra, message, tmp_path, images, monkeypatch, capsys):
    stage = tmp_path / "stage"  # a stage folder as far as the checks read it: trained with data.max_views=2
    stage.mkdir()
    (stage / "stage.json").write_text("{}")
    (stage / "config.yaml").write_text("data: {max_views: 2}\n")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(G.ReportModel, "load", classmethod(no_load))
    argv = ["generate", str(stage)] + [images[0][1] if a == "A" else a for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clinicalblip generate: error: ")
    assert message in err, err


def test_report_model_refuses_too_many_views_and_unsampled_temperature(rm, images, monkeypatch):
    from clinicalblip.study import StudyInputError

    _capture(rm, monkeypatch)
    p = images[0][0]
    with pytest.raises(StudyInputError, match="at most 2 views"):
        rm.report([p, p, p])
    with pytest.raises(StudyInputError, match="temperature: only applies with do_sample"):
        rm.report([p], temperature=0.5)
    with pytest.raises(StudyInputError, match="shoe_size"):
        from clinicalblip.study import check_context
        check_context({"shoe_size": "44"})


def test_api_accepts_every_slot_and_refuses_like_the_cli(rm, images, monkeypatch):
    _capture(rm, monkeypatch)
    png = open(images[0][0], "rb").read()
    with TestClient(create_app(ReportService(rm))) as client:
        one = [("images", ("a.png", png, "image/png"))]
        r = client.post("/v1/reports", files=one, data={"temperature": "0.7"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "temperature"
        assert "only applies with do_sample=true" in r.json()["error"]["message"]
        r = client.post("/v1/reports", files=one * 3)
        assert r.status_code == 422 and "at most 2 views" in r.json()["error"]["message"]
        r = client.post("/v1/reports", files=one, data={"age": "54", "sex": "F", "hints": "effusion"})
        assert r.status_code == 200, r.text
        if "age" in rm.template.slots:
            assert "Age: 54" in r.json()["prompt"] and "effusion" in r.json()["prompt"]
        r = client.post("/v1/preview", files=[("images", ("a.png", png, "image/png"))])  # item 15: same field name
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = client.post("/v1/preview", files=[("image", ("a.png", png, "image/png"))])  # the old name still works
        assert r.status_code == 200
