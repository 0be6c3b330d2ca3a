"""Shape-true presets: real widths, ids and tokenizer behaviour, without building 7B of weights.

Configs and counts are checked on the meta device; the end-to-end chain at `model.layers: 1` is the slow test
in test_shapes_chain.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import InstructBlipForConditionalGeneration

from clinicalblip.config import ConfigError, stage_config_from_dict
from clinicalblip.data.collate import StudyCollator
from clinicalblip.model import build_base, is_builtin
from clinicalblip.prompts import load_template
from clinicalblip.shapes import build_shape_processor, full_depth_counts, shape_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vicuna_processor():
    return build_shape_processor("shape-vicuna7b", corpus=["The heart is enlarged. No pleural effusion."])


@pytest.fixture(scope="module")
def t5_processor():
    return build_shape_processor("shape-flant5xl", corpus=["The heart is enlarged. No pleural effusion."])


def _stage_cfg(yaml_path: str, *over: str):
    data = yaml.safe_load((REPO / yaml_path).read_text())
    data["data"]["manifest"] = "unused.jsonl"
    return stage_config_from_dict(data, list(over))


def test_vicuna7b_config_has_the_real_widths():
    c = shape_config("shape-vicuna7b")
    v, q, t = c.vision_config, c.qformer_config, c.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1408, 6144, 39, 16)
    assert (v.image_size, v.patch_size, c.num_query_tokens) == (224, 14, 32)
    assert (q.hidden_size, q.num_hidden_layers, q.vocab_size, q.encoder_hidden_size, q.cross_attention_frequency) \
        == (768, 12, 30523, 1408, 2)
    assert (t.model_type, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) \
        == ("llama", 4096, 11008, 32, 32)
    assert (t.vocab_size, c.image_token_id, t.pad_token_id) == (32064, 32001, 32000)


def test_flant5xl_config_has_the_real_widths():
    c = shape_config("shape-flant5xl")
    t = c.text_config
    assert (t.model_type, t.d_model, t.d_ff, t.d_kv, t.num_heads) == ("t5", 2048, 5120, 64, 32)
    assert (t.num_layers, t.num_decoder_layers, t.vocab_size, t.is_gated_act) == (24, 24, 32128, True)
    assert (c.image_token_id, c.num_query_tokens, c.vision_config.hidden_size, c.qformer_config.hidden_size) \
        == (32100, 32, 1408, 768)
    assert c.use_decoder_only_language_model is False


def test_layers_cuts_every_tower_and_keeps_the_widths():
    v = shape_config("shape-vicuna7b", layers=1)
    assert (v.vision_config.num_hidden_layers, v.qformer_config.num_hidden_layers,
            v.text_config.num_hidden_layers) == (1, 1, 1)
    assert v.text_config.hidden_size == 4096 and v.vision_config.hidden_size == 1408
    t = shape_config("shape-flant5xl", layers=2).text_config
    assert (t.num_layers, t.num_decoder_layers, t.d_model) == (2, 2, 2048)
    with torch.device("meta"):
        m = InstructBlipForConditionalGeneration(shape_config("shape-flant5xl", layers=2))
    assert len(m.language_model.encoder.block) == len(m.language_model.decoder.block) == 2
    assert len(m.vision_model.encoder.layers) == len(m.qformer.encoder.layer) == 2
    # module names of the real checkpoint (LoRA targets and release keys depend on them)
    names = {n for n, _ in m.named_parameters()}
    assert "language_model.encoder.block.0.layer.0.SelfAttention.q.weight" in names
    assert "language_model.decoder.block.1.layer.2.DenseReluDense.wi_1.weight" in names
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in names
    assert "vision_model.encoder.layers.1.self_attn.qkv.weight" in names


def test_vicuna_tokenizer_ids_and_behaviour(vicuna_processor):
    tok, qtok = vicuna_processor.tokenizer, vicuna_processor.qformer_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer" and len(tok) == 32003
    assert tok.convert_tokens_to_ids(["[PAD]", "<image>", "<video>"]) == [32000, 32001, 32002]
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]) == [0, 1, 2, 3, 258]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 32000)  # LAVIS: bos = eos = </s>
    ids = tok("The heart is enlarged.\nGröße → 3 cm")["input_ids"]
    assert ids[0] == 2 and ids[-1] != 2  # BOS prepended, no EOS appended
    pieces = tok.convert_ids_to_tokens(ids)
    assert "▁heart" in pieces and "<0x0A>" in pieces  # sentencepiece word boundary; newline by byte fallback
    assert "<0xE2>" in pieces  # '→' never seen: its UTF-8 bytes
    assert tok.decode(ids, skip_special_tokens=True) == "The heart is enlarged.\nGröße → 3 cm"
    assert type(qtok).__name__ == "BertTokenizer" and len(qtok) == 30523
    assert (qtok.pad_token_id, qtok.unk_token_id, qtok.cls_token_id, qtok.sep_token_id, qtok.bos_token_id) \
        == (0, 100, 101, 102, 30522)  # [DEC] = 30522 as in the real Q-Former tokenizer
    q = qtok("The heart")["input_ids"]
    assert q[0] == 101 and q[-1] == 102


def test_t5_tokenizer_ids_and_behaviour(t5_processor):
    tok = t5_processor.tokenizer
    assert type(tok).__name__ == "T5Tokenizer" and len(tok) == 32102
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>", "<image>", "<video>"]) == \
        [32099, 32000, 32100, 32101]
    ids = tok("The heart is enlarged.")["input_ids"]
    assert ids[-1] == 1 and ids[0] != tok.convert_tokens_to_ids("<s>")  # EOS appended, no BOS
    assert "▁heart" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "The heart is enlarged."


def test_two_views_give_64_image_tokens(vicuna_processor, tmp_path):
    from PIL import Image

    paths = []
    for i in range(2):
        p = tmp_path / f"v{i}.png"
        Image.new("L", (64, 64), 100 + i).save(p)
        paths.append(str(p))
    record = {"id": "s1", "images": [{"path": paths[0], "view": "PA"}, {"path": paths[1], "view": "LATERAL"}],
              "indication": "Chest pain.", "findings": "The heart is enlarged."}
    collate = StudyCollator(processor=vicuna_processor, template=load_template("findings_with_context"),
                            num_query_tokens=vicuna_processor.num_query_tokens, decoder_only=True, mode="train")
    batch = collate([record])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(32001) == 64 and ids[:64] == [32001] * 64 and ids[64] == 2  # then BOS + prompt
    assert tuple(batch["pixel_values"].shape) == (2, 3, 224, 224)
    assert batch["qformer_input_ids"].shape[0] == 2  # one Q-Former prompt per view
    # plain transformers' processor expands one image into num_query_tokens (32) image tokens
    plain = vicuna_processor(images=Image.open(paths[0]).convert("RGB"), text="Findings:", return_tensors="pt")
    assert plain["input_ids"][0].tolist().count(32001) == 32


def test_full_depth_counts_match_the_real_widths():
    # stage 3: LoRA r=8 on the 7 LLaMA projections of 32 layers: 32 * 8 * (4*(4096+4096) + 3*(4096+11008))
    cfg = _stage_cfg("configs/vicuna7b/stage3.yaml", "parent=null", "model.base=shape-vicuna7b")
    c = full_depth_counts(shape_config("shape-vicuna7b", layers=1), "shape-vicuna7b", cfg)
    assert c["trainable"] == 32 * 8 * (4 * 8192 + 3 * 15104) == 19_988_480
    # InstructBLIP-Vicuna-7B is published as 7.91B parameters
    assert 7.90e9 < c["total"] - c["trainable"] < 7.92e9


def test_full_depth_counts_equal_a_real_model_for_tiny(stage1_dir):
    from clinicalblip.model import load_pretrained
    from clinicalblip.policy import apply_trainable
    from clinicalblip.stages import read_stage

    model, _ = load_pretrained(str(stage1_dir / "base"))
    cfg = stage_config_from_dict(yaml.safe_load((stage1_dir / "config.yaml").read_text()))
    real = apply_trainable(model, cfg)[1]["total"]
    c = full_depth_counts(model.config, "tiny", cfg)
    assert (c["trainable"], c["total"]) == (real["trainable"], real["trainable"] + real["frozen"])
    assert read_stage(stage1_dir)["trainable"]["total"]["trainable"] == c["trainable"]


def test_layers_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="model.layers=1 applies to the shape-\\* presets only"):
        _stage_cfg("configs/tiny/stage1.yaml", "model.layers=1")
    with pytest.raises(ConfigError, match="model.layers must be >= 0"):
        _stage_cfg("configs/vicuna7b/stage1.yaml", "model.base=shape-vicuna7b", "model.layers=-1")
    with pytest.raises(Exception, match="applies to the shape presets"):
        build_base("tiny", layers=1)
    assert is_builtin("shape-vicuna7b") and is_builtin("tiny") and not is_builtin("Salesforce/instructblip-vicuna-7b")
