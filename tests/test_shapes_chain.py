"""The shipped vicuna7b and flant5xl stage chains at the real widths (model.layers: 1), merged and reloaded.

Slow (about 8 minutes on 2 cores, 4 GiB): opt in with `./test.sh -m slow tests/test_shapes_chain.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHORT = ["model.layers=1", "data.limit=6", "train.max_steps=2", "train.batch_size=2", "data.val_max=2",
         "train.log_every=1", "train.save_every=0"]


def _cfg(name: str, manifest: Path, out: Path, *over: str, family: str = "vicuna7b"):
    from clinicalblip.config import stage_config_from_dict

    data = yaml.safe_load((REPO / "configs" / family / name).read_text())
    data["data"]["manifest"] = str(manifest)
    data["output_dir"] = str(out)
    return stage_config_from_dict(data, SHORT + list(over))


@pytest.mark.slow
def test_vicuna7b_chain_at_real_widths(tmp_path, capsys):
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from clinicalblip.cli import main
    from clinicalblip.data.synth import write_synthetic_dataset
    from clinicalblip.stages import read_stage
    from clinicalblip.train import train_stage

    manifest = write_synthetic_dataset(tmp_path / "data", n=16, seed=5)
    s1 = train_stage(_cfg("stage1.yaml", manifest, tmp_path / "s1", "model.base=shape-vicuna7b"))
    s2 = train_stage(_cfg("stage2.yaml", manifest, tmp_path / "s2", f"parent={s1}"))
    header = capsys.readouterr().out
    # the run header counts the real model: 7.9B parameters at full depth, not the 1-layer one
    assert "full depth: 203,531,008 trainable / 7,928,423,168 total" in header
    info1, info2 = read_stage(s1), read_stage(s2)
    assert info1["base"]["name"] == "shape-vicuna7b" and (s1 / "base" / "config.json").is_file()
    assert info2["has_adapter"] and info2["trainable"]["language_model"]["trainable"] > 0
    losses = [json.loads(line)["loss"] for line in (s2 / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < x < 20 for x in losses)  # finite, about ln(32064) = 10.4 for random weights

    release = tmp_path / "release"
    assert main(["merge", str(s2), "--out", str(release)]) == 0
    cfg = json.loads((release / "config.json").read_text())
    assert (cfg["text_config"]["hidden_size"], cfg["vision_config"]["hidden_size"],
            cfg["qformer_config"]["hidden_size"], cfg["num_query_tokens"]) == (4096, 1408, 768, 32)
    assert cfg["text_config"]["vocab_size"] == 32064 and cfg["image_token_index"] == 32001

    # plain transformers: load, and greedy-generate the way the model card says (one view, the processor's
    # own 32 image tokens + BOS + prompt)
    model = InstructBlipForConditionalGeneration.from_pretrained(release).eval()
    processor = InstructBlipProcessor.from_pretrained(release)
    assert model.language_model.model.embed_tokens.weight.shape == (32064, 4096)
    image = str(manifest.parent / "images" / "synth-00003_frontal.png")
    capsys.readouterr()
    assert main(["generate", str(release), "--image", image, "--indication", "Chest pain.",
                 "--max-new-tokens", "8", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    inputs = processor(images=Image.open(image).convert("RGB"), text=ours["prompt"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(32001) == 32
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) > 0
    plain = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert plain == ours["report"]

    # and two views through clinicalblip: 2 x 32 image tokens in the prompt, accepted by the model
    lateral = str(manifest.parent / "images" / "synth-00003_lateral.png")
    capsys.readouterr()
    assert main(["generate", str(release), "--image", image, "--image", lateral, "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_views"] == 2


def _release_generates(stage: Path, release: Path, manifest: Path, capsys) -> str:
    """Merge with the CLI, reload with plain transformers, and check its greedy text against `generate`'s."""
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from clinicalblip.cli import main

    assert main(["merge", str(stage), "--out", str(release)]) == 0
    model = InstructBlipForConditionalGeneration.from_pretrained(release).eval()
    processor = InstructBlipProcessor.from_pretrained(release)
    image = str(manifest.parent / "images" / "synth-00004_frontal.png")
    capsys.readouterr()
    assert main(["generate", str(release), "--image", image, "--max-new-tokens", "6", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    inputs = processor(images=Image.open(image).convert("RGB"), text=ours["prompt"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    if model.config.use_decoder_only_language_model:
        out = out[:, inputs["input_ids"].shape[1]:]
    assert processor.tokenizer.decode(out[0], skip_special_tokens=True).strip() == ours["report"]
    return ours["report"]


@pytest.mark.slow
def test_vicuna7b_stage3_and_flant5xl_chain_run_end_to_end(tmp_path, capsys):
    from clinicalblip.data.synth import write_synthetic_dataset
    from clinicalblip.stages import read_stage
    from clinicalblip.train import train_stage

    manifest = write_synthetic_dataset(tmp_path / "data", n=16, seed=6)
    # vicuna7b stage 3 (findings + impression, LLM LoRA r=8) on top of stages 1 and 2
    v1 = train_stage(_cfg("stage1.yaml", manifest, tmp_path / "v1", "model.base=shape-vicuna7b"))
    v2 = train_stage(_cfg("stage2.yaml", manifest, tmp_path / "v2", f"parent={v1}"))
    v3 = train_stage(_cfg("stage3.yaml", manifest, tmp_path / "v3", f"parent={v2}"))
    assert read_stage(v3)["template"] == "findings_impression_with_context"
    _release_generates(v3, tmp_path / "v_release", manifest, capsys)

    # flant5xl stage 1 -> 2: the T5 encoder-decoder at 2048 wide, LoRA on q/k/v/o/wi_0/wi_1/wo
    f1 = train_stage(_cfg("stage1.yaml", manifest, tmp_path / "f1", "model.base=shape-flant5xl", family="flant5xl"))
    f2 = train_stage(_cfg("stage2.yaml", manifest, tmp_path / "f2", f"parent={f1}", family="flant5xl"))
    header = capsys.readouterr().out
    assert "full depth: 222,649,088 trainable / 3,992,560,384 total" in header  # the real 24 + 24 layers
    assert read_stage(f2)["trainable"]["language_model"]["trainable"] > 0
    _release_generates(f2, tmp_path / "f_release", manifest, capsys)
    cfg = json.loads((tmp_path / "f_release" / "config.json").read_text())
    assert (cfg["text_config"]["d_model"], cfg["text_config"]["vocab_size"], cfg["image_token_index"]) == \
        (2048, 32128, 32100)
