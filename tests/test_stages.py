"""Stage behaviour on the tiny model: what trains, chaining, merging, plain-transformers releases."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from clinicalblip.data.collate import StudyCollator, model_inputs
from clinicalblip.data.manifest import read_manifest
from clinicalblip.model import load_pretrained
from clinicalblip.policy import apply_trainable, core_model
from clinicalblip.stages import load_stage_model, load_template_of, stage_chain

from conftest import tiny_stage_cfg

# The last Q-Former layer's text-branch FFN feeds only the text positions, which nothing downstream reads:
# the LM sees the query outputs only. It never gets a gradient from the LM loss.
NO_GRAD_FROM_LM = ("intermediate.dense", "output.dense", "output.LayerNorm")


def _last_qformer_text_ffn(model) -> set[str]:
    last = model.config.qformer_config.num_hidden_layers - 1
    prefix = f"qformer.encoder.layer.{last}."
    return {n for n, _ in model.named_parameters()
            if n.startswith(prefix) and any(n[len(prefix):].startswith(s) for s in NO_GRAD_FROM_LM)}


def _probe(processor, template, manifest, decoder_only=True, n=3):
    recs = read_manifest(manifest, split="val")[:n]
    col = StudyCollator(processor=processor, template=template, num_query_tokens=processor.num_query_tokens,
                        decoder_only=decoder_only, mode="train")
    return model_inputs(col(recs))


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(**batch).logits


def test_stage1_changes_every_trained_tensor(stage1_dir):
    base, _ = load_pretrained(str(stage1_dir / "base"))
    after, _, _ = load_stage_model(stage1_dir)
    before = dict(base.named_parameters())
    silent = _last_qformer_text_ffn(base)
    assert silent, "expected the last Q-Former layer's text FFN tensors"
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    # stage 1 trains every component fully: all tensors move except those the LM loss cannot reach
    assert changed == set(before) - silent
    info = json.loads((stage1_dir / "stage.json").read_text())
    assert info["parent"] is None and info["base"]["name"] == "tiny"
    assert info["trainable"]["language_model"]["policy"] == "full"


def test_stage2_changes_exactly_its_policy(stage1_dir, stage2_dir):
    parent, _, _ = load_stage_model(stage1_dir)
    chain_model, _, _ = load_stage_model(stage2_dir, keep_last_unmerged=True)
    assert isinstance(chain_model, PeftModel)
    before = dict(parent.named_parameters())
    silent = _last_qformer_text_ffn(parent)
    lora_modules = set()
    for name, p in core_model(chain_model).named_parameters():
        if "lora_" in name:
            lora_modules.add(name.split(".", 1)[0])
            continue
        plain = name.replace(".base_layer.", ".")
        comp = plain.split(".", 1)[0]
        same = torch.equal(p, before[plain])
        if comp in ("vision_model", "language_model"):  # lora: base weights untouched
            assert same, f"{plain} is under LoRA and must not change"
        elif plain in silent:
            assert same
        else:  # qformer, query_tokens, language_projection: full
            assert not same, f"{plain} is trained fully and should have changed"
    assert lora_modules == {"vision_model", "language_model"}
    # LoRA weights moved away from their (non-identity) start
    adapter = json.loads((stage2_dir / "adapter" / "adapter_config.json").read_text())
    ranks = set(adapter["rank_pattern"].values())  # per-component ranks from the stage YAML
    assert ranks == {16, 32}
    info = json.loads((stage2_dir / "stage.json").read_text())
    assert info["parent"] == "../stage1"
    assert set(info["full_components"]) == {"qformer", "query_tokens", "language_projection"}


def test_next_stage_at_step_zero_reproduces_previous(stage1_dir, synth_manifest, tmp_path):
    model, processor, _ = load_stage_model(stage1_dir)
    batch = _probe(processor, load_template_of(stage1_dir), synth_manifest)
    ref = _logits(model, batch)
    cfg = tiny_stage_cfg("stage2.yaml", synth_manifest, tmp_path / "s2", parent=stage1_dir)
    wrapped, report = apply_trainable(model, cfg)  # standard LoRA init: B = 0
    assert report["language_model"]["trainable"] > 0 and report["vision_model"]["trainable"] > 0
    got = _logits(core_model(wrapped), batch)
    assert torch.allclose(got, ref, atol=1e-6)


def test_chain_folder_is_self_describing(stage2_dir):
    chain = stage_chain(stage2_dir)
    assert [s["name"] for s in chain] == ["stage1", "stage2"]
    for f in ("stage.json", "config.yaml", "template.yaml", "trained.safetensors", "adapter/adapter_model.safetensors",
              "processor/tokenizer.json", "processor/qformer_tokenizer/tokenizer.json"):
        assert (stage2_dir / f).is_file(), f


def test_merge_equals_adapter_chain_and_loads_in_plain_transformers(stage2_dir, synth_manifest, tmp_path):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from clinicalblip.merge import merge_stage_chain

    info = merge_stage_chain(str(stage2_dir), str(tmp_path / "release"))
    assert info["max_abs_logit_diff"] <= 1e-4
    release = tmp_path / "release"
    model = InstructBlipForConditionalGeneration.from_pretrained(release)
    processor = InstructBlipProcessor.from_pretrained(release)
    assert not any("lora" in n for n, _ in model.named_parameters())
    chain_model, _, _ = load_stage_model(stage2_dir, keep_last_unmerged=True)
    batch = _probe(processor, load_template_of(stage2_dir), synth_manifest)
    diff = (_logits(model, batch) - _logits(chain_model, batch)).abs().max().item()
    assert diff <= 1e-4
    # the LoRA is not an identity: the chain differs from stage 1 alone
    s1, _, _ = load_stage_model(stage2_dir.parent / "stage1")
    assert (_logits(s1, batch) - _logits(model, batch)).abs().max().item() > 1e-3
    # size ~ base: no adapter tensors, same parameter count as the base
    base, _ = load_pretrained(str(stage2_dir.parent / "stage1" / "base"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
    card = (release / "README.md").read_text()
    assert "stage1" in card and "stage2" in card and "Intended use" in card
    meta = json.loads((release / "clinicalblip.json").read_text())
    assert meta["template"] == "findings_with_context"


def test_release_greedy_equals_clinicalblip_generate(stage2_dir, synth_manifest, tmp_path):
    """Single view: plain transformers on the --json prompt gives the same text as clinicalblip."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from clinicalblip.data.images import load_image
    from clinicalblip.generate import generate_single
    from clinicalblip.merge import merge_stage_chain

    merge_stage_chain(str(stage2_dir), str(tmp_path / "rel"))
    rec = read_manifest(synth_manifest, split="test")[0]
    image = rec["images"][0]["path"]
    # min_new_tokens: a barely trained model may stop at once, which would make the comparison trivial
    ours = generate_single(str(stage2_dir), images=[image], indication=rec["indication"], max_new_tokens=24,
                           min_new_tokens=24)
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "rel").eval()
    processor = InstructBlipProcessor.from_pretrained(tmp_path / "rel")
    inputs = processor(images=load_image(image), text=ours["prompt"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=1)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert text == ours["report"]
    assert len(ours["report"]) > 0
    # the release folder generates the same through clinicalblip too
    assert generate_single(str(tmp_path / "rel"), images=[image], indication=rec["indication"],
                           max_new_tokens=24, min_new_tokens=24)["report"] == ours["report"]


def test_multiview_uses_each_view(stage2_dir, synth_manifest):
    """Two views give two blocks of query tokens; dropping or swapping the lateral changes the output."""
    model, processor, _ = load_stage_model(stage2_dir)
    tpl = load_template_of(stage2_dir)
    rec = next(r for r in read_manifest(synth_manifest, split="train") if len(r["images"]) == 2)
    one = dict(rec, images=rec["images"][:1])
    col = StudyCollator(processor=processor, template=tpl, num_query_tokens=processor.num_query_tokens, mode="generate")
    b2, b1 = col([rec]), col([one])
    q = processor.num_query_tokens
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (b2["input_ids"] == image_id).sum() == 2 * q and (b1["input_ids"] == image_id).sum() == q
    assert b2["pixel_values"].shape[0] == 2 and b1["pixel_values"].shape[0] == 1
    # mixed batch (2 views + 1 view) equals each study alone (views scatter into their own study)
    both = col([rec, one])
    l_both = _logits(model, model_inputs(both))
    l_two = _logits(model, model_inputs(b2))
    n2 = b2["input_ids"].shape[1]
    assert torch.allclose(l_both[0, -n2:][b2["attention_mask"][0].bool()], l_two[0][b2["attention_mask"][0].bool()],
                          atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-t5"])
def test_encoder_decoder_stage_trains_generates_and_merges(preset, synth_manifest, tmp_path):
    from clinicalblip.generate import generate_single
    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.train import train_stage

    s1 = tmp_path / "t5s1"
    train_stage(tiny_stage_cfg("stage1.yaml", synth_manifest, s1, **{"model.base": preset}))
    s2 = tmp_path / "t5s2"
    train_stage(tiny_stage_cfg("stage2.yaml", synth_manifest, s2, parent=s1, **{"lora.init": "gaussian"}))
    model, _, _ = load_stage_model(s2)
    assert not model.config.use_decoder_only_language_model
    info = merge_stage_chain(str(s2), str(tmp_path / "t5rel"))
    assert info["max_abs_logit_diff"] <= 1e-4
    rec = read_manifest(synth_manifest, split="test")[0]
    out = generate_single(str(s2), images=[im["path"] for im in rec["images"]], indication="Chest pain.",
                          max_new_tokens=8)
    assert set(out) >= {"prompt", "qformer_prompt", "report", "max_new_tokens"}
