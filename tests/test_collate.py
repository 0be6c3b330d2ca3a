"""The collator: loss mask and layouts (LLaMA-style and T5), the image-token cross-check, prompt shortening."""

from __future__ import annotations

import pytest
from PIL import Image

from clinicalblip.data.collate import IGNORE_INDEX, StudyCollator
from clinicalblip.errors import UserError
from clinicalblip.prompts import load_template
from clinicalblip.tiny import build_tiny_model, build_tiny_processor

CORPUS = ["The heart is normal in size.", "The lungs are clear.", "Chest pain.", "Fever and cough."]


@pytest.fixture(scope="module")
def llama():
    proc = build_tiny_processor("tiny", corpus=CORPUS)
    return proc, build_tiny_model(proc, "tiny")


@pytest.fixture(scope="module")
def t5():
    proc = build_tiny_processor("tiny-t5", corpus=CORPUS)
    return proc, build_tiny_model(proc, "tiny-t5")


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i, shade in enumerate((40, 200)):
        p = tmp_path / f"v{i}.png"
        Image.new("L", (64, 64), shade).save(p)
        paths.append(str(p))
    return paths


def _records(images):
    return [
        {"id": "a", "images": [{"path": images[0], "view": "PA"}, {"path": images[1], "view": "LATERAL"}],
         "indication": "Chest pain.", "findings": "The heart is normal in size. The lungs are clear."},
        {"id": "b", "images": [{"path": images[0], "view": "PA"}], "indication": None, "findings": "The lungs are clear."},
    ]


def _collator(proc, decoder_only, **kw):
    return StudyCollator(processor=proc, template=load_template("findings_with_context"),
                         num_query_tokens=proc.num_query_tokens, decoder_only=decoder_only, mode="train", **kw)


def test_decoder_only_labels_mask_images_and_prompt(llama, images):
    proc, _ = llama
    tok, nq = proc.tokenizer, proc.num_query_tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    coll = _collator(proc, True)
    recs = _records(images)
    batch = coll(recs)
    assert batch["pixel_values"].shape[0] == 3  # one row per view: 2 + 1
    for i, (rec, prompt) in enumerate(zip(recs, batch["prompts"])):
        n_img = len(rec["images"]) * nq
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        tgt = tok(rec["findings"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = n_img + len(p_ids) + len(tgt)
        ids, labels, mask = (batch[k][i].tolist() for k in ("input_ids", "labels", "attention_mask"))
        assert ids[:n_img] == [image_id] * n_img and image_id not in ids[n_img:n]
        assert ids[n_img:n_img + len(p_ids)] == p_ids and ids[n_img + len(p_ids):n] == tgt
        assert labels[:n_img + len(p_ids)] == [IGNORE_INDEX] * (n_img + len(p_ids))  # images + prompt: no loss
        assert labels[n_img + len(p_ids):n] == tgt  # the report and its EOS are learned
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n) and mask == [1] * n + [0] * (len(mask) - n)
    assert batch["input_ids"].shape[1] > len(batch["input_ids"][1][batch["attention_mask"][1] == 1])


def test_t5_layout_puts_the_report_in_the_labels_only(t5, images):
    proc, _ = t5
    tok, nq = proc.tokenizer, proc.num_query_tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    batch = _collator(proc, False)(_records(images))
    for i, rec in enumerate(_records(images)):
        n_img = len(rec["images"]) * nq
        p_ids = tok(batch["prompts"][i], add_special_tokens=True)["input_ids"]
        tgt = tok(rec["findings"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = batch["input_ids"][i].tolist()
        labels = batch["labels"][i].tolist()
        assert ids[: n_img + len(p_ids)] == [image_id] * n_img + p_ids  # encoder: images + prompt, no report
        assert labels[: len(tgt)] == tgt and labels[len(tgt):] == [IGNORE_INDEX] * (len(labels) - len(tgt))


def test_image_token_mismatch_is_refused(llama, images, monkeypatch):
    proc, model = llama
    coll = _collator(proc, True)
    assert coll.check_image_tokens(model.config) == model.config.image_token_id
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.image_token_id = model.config.image_token_id + 1  # a config from another tokenizer
    with pytest.raises(UserError, match=r"config.image_token_id is \d+.*same checkpoint"):
        coll.check_image_tokens(cfg)
    with pytest.raises(UserError, match="8 image tokens per view but the model's config.num_query_tokens is 9"):
        cfg2 = model.config.__class__.from_dict(model.config.to_dict())
        cfg2.num_query_tokens = 9
        coll.check_image_tokens(cfg2)
    # a tokenizer without <image> (an older snapshot): the id would be unk and no image ever seen
    unk = proc.tokenizer.unk_token_id
    monkeypatch.setattr(proc.tokenizer, "convert_tokens_to_ids", lambda t: unk)
    with pytest.raises(UserError, match="tokenizer has no '<image>' token"):
        coll.check_image_tokens(model.config)
    with pytest.raises(UserError, match="no '<image>' token"):
        coll(_records(images))


def test_image_token_in_the_text_is_refused(llama, images):
    proc, _ = llama
    rec = dict(_records(images)[0], history="See <image> attached.")
    with pytest.raises(UserError, match="record a: its prompt text contains '<image>'"):
        _collator(proc, True)([rec])


def test_long_context_is_shortened_history_first_never_the_instruction(llama, images):
    proc, _ = llama
    tok = proc.tokenizer
    coll = _collator(proc, True, max_prompt_tokens=48)
    long = {"id": "long", "images": [{"path": images[0], "view": "PA"}], "indication": "Chest pain.",
            "history": " ".join(["cough"] * 300), "comparison": "None.", "findings": "The lungs are clear."}
    short = dict(_records(images)[1])
    assert coll.count_shortened([long, short]) == 1
    batch = coll([long, short])
    prompt = batch["prompts"][0]
    assert prompt.endswith("Write the findings of this chest radiograph.")
    assert prompt.startswith("Indication: Chest pain.\nHistory: cough") and "Comparison: None." in prompt
    assert len(tok(prompt)["input_ids"]) <= 48 and coll.shortened == {"long"}
    n_img = proc.num_query_tokens
    assert batch["input_ids"][0, :n_img].tolist() == [tok.convert_tokens_to_ids("<image>")] * n_img  # kept

    # history gone entirely is not enough: the comparison is shortened next, the indication kept
    both = dict(long, comparison=" ".join(["prior"] * 300))
    prompt = coll([both])["prompts"][0]
    assert "History:" not in prompt and "Comparison: prior" in prompt and prompt.startswith("Indication: Chest pain.")
    assert prompt.endswith("Write the findings of this chest radiograph.")

    with pytest.raises(UserError, match="record long: .*longer than data.max_prompt_tokens=4 .*raise data.max_prompt_tokens"):
        _collator(proc, True, max_prompt_tokens=4).count_shortened([long])


def test_mismatched_image_token_stops_training_and_generation(llama, synth_manifest, tmp_path):
    import json

    from clinicalblip.generate import ReportModel
    from clinicalblip.train import train_stage

    from conftest import tiny_stage_cfg

    proc, model = llama
    folder = tmp_path / "older_snapshot"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["image_token_id"] = model.config.image_token_id + 1  # the config of another tokenizer
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "stage"
    with pytest.raises(UserError, match="image token mismatch: .* config.image_token_id is"):
        train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, out, **{"model.base": str(folder)}))
    assert not (out / "stage.json").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="image token mismatch"):
        ReportModel.load(str(folder))
