"""QLoRA on the CPU (bitsandbytes >= 0.49): 4-bit and 8-bit stages on top of a parent train, chain, merge into the
unquantized base with both verification numbers recorded, and generate quantized."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_stage_cfg

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def qstage(request, stage1_dir, synth_manifest):
    from clinicalblip.train import train_stage

    quant = request.param
    out = stage1_dir.parent / f"qlora_{quant}"
    cfg = tiny_stage_cfg("stage2.yaml", synth_manifest, out, parent=stage1_dir, **{
        "model.quantization": quant, "model.dtype": "bf16", "train.max_steps": 6, "optim.lr": 3e-3,
        "lora.init": "gaussian"})
    train_stage(cfg)
    return quant, out


def test_qlora_stage_trains_on_cpu_with_a_quantized_language_model(qstage, stage1_dir):
    import bitsandbytes as bnb

    from clinicalblip.stages import load_stage_model

    quant, out = qstage
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 6 and loss[-1] < loss[0], loss
    info = json.loads((out / "stage.json").read_text())
    assert info["has_adapter"] and info["parent"]
    # the chain as trained: parent merged, language model quantized in memory, this stage's LoRA live
    model, _, chain = load_stage_model(out, quantization=quant)
    assert [c["name"] for c in chain] == ["stage1", "stage2"]
    kind = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    lm_layers = [m for n, m in model.named_modules() if "language_model" in n and isinstance(m, kind)]
    vision_layers = [m for n, m in model.named_modules() if "vision_model" in n and isinstance(m, kind)]
    assert lm_layers and not vision_layers  # only the language model is quantized
    assert not (out / ".parent_merged").exists()  # the parent chain was quantized in memory, not on disk


def test_qlora_merge_records_both_differences_and_release_loads(qstage, tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    from clinicalblip.merge import merge_stage_chain

    quant, out = qstage
    info = merge_stage_chain(str(out), str(tmp_path / "rel"))
    assert info["max_abs_logit_diff"] <= info["tolerance"]  # against the unquantized chain: exact up to fp32
    meta = json.loads((tmp_path / "rel" / "clinicalblip.json").read_text())["verification"]
    assert meta["trained_quantization"] == quant
    # against the chain as trained: quantization error, finite, well above fp32 noise
    assert 1e-4 < meta["max_abs_logit_diff_vs_trained"] < 5.0
    card = (tmp_path / "rel" / "README.md").read_text()
    assert f"trained on a {quant} quantized language model" in card
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "rel")
    assert not getattr(model, "is_loaded_in_4bit", False)  # released unquantized


def test_generate_loads_stage_and_release_quantized(qstage, synth_manifest, tmp_path):
    from clinicalblip.data.manifest import read_manifest
    from clinicalblip.generate import ReportModel
    from clinicalblip.merge import merge_stage_chain

    quant, out = qstage
    rec = next(r for r in read_manifest(synth_manifest) if r["split"] == "test")
    images = [im["path"] for im in rec["images"]]
    stage = ReportModel.load(str(out), quantization=quant)
    text = stage.report(images, indication=rec.get("indication"), max_new_tokens=12)["report"]
    assert isinstance(text, str) and text
    merge_stage_chain(str(out), str(tmp_path / "rel"))
    rel = ReportModel.load(str(tmp_path / "rel"), quantization=quant)
    assert getattr(rel.model, f"is_loaded_in_{quant}")
    assert rel.report(images, indication=rec.get("indication"), max_new_tokens=12)["report"]
