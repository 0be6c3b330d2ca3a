from pathlib import Path

import pytest

from clinicalblip.config import ConfigError, load_stage_config, stage_config_from_dict

REPO = Path(__file__).resolve().parents[1]
STAGE_YAMLS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", STAGE_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_stage_yaml_validates(path):
    cfg = load_stage_config(path)
    assert cfg.output_dir and cfg.data.manifest
    assert any(getattr(cfg.trainable, c) != "frozen" for c in
               ("vision_model", "qformer", "query_tokens", "language_projection", "language_model"))


def test_tiny_configs_chain():
    s1 = load_stage_config(REPO / "configs/tiny/stage1.yaml")
    s2 = load_stage_config(REPO / "configs/tiny/stage2.yaml")
    assert s1.parent is None and s2.parent == s1.output_dir


BASE = {"output_dir": "o", "data": {"manifest": "m.jsonl"}, "trainable": {"qformer": "full"}}


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'"):
        stage_config_from_dict(BASE, ["optim.lrr=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be an integer"):
        stage_config_from_dict(BASE, ["train.batch_size=big"])


def test_overrides_apply_with_yaml_types():
    cfg = stage_config_from_dict(BASE, ["optim.lr=3e-4", "trainable.language_model=lora", "lora.language_model.r=4",
                                        "data.cache_images=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.trainable.language_model == "lora" and cfg.lora.language_model.r == 4 and cfg.data.cache_images


@pytest.mark.parametrize("override,msg", [
    ("trainable.query_tokens=lora", "single tensor"),
    ("trainable.qformer=half", "must be one of"),
    ("model.dtype=int3", "model.dtype"),
    ("data.on_bad_record=ignore", "on_bad_record"),
    ("optim.lr_mult={vision: 2}", "unknown component"),
])
def test_impossible_settings_rejected(override, msg):
    with pytest.raises(ConfigError, match=msg):
        stage_config_from_dict(BASE, [override])


def test_all_frozen_rejected():
    with pytest.raises(ConfigError, match="nothing would train"):
        stage_config_from_dict({**BASE, "trainable": {}})


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_stage_config(p)


@pytest.mark.parametrize("overrides,msg", [
    (["model.quantization=4bit", "trainable.language_model=full"], "cannot be trained fully"),
    (["model.quantization=4bit", "trainable.language_model=lora"], "set model.dtype=bf16"),
    (["model.quantization=3bit"], "none, 4bit or 8bit"),
    (["data.check_images=maybe"], "decode, exists or none"),
])
def test_impossible_precision_combinations_rejected_before_loading(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        stage_config_from_dict(BASE, overrides)


def test_fp16_on_cpu_rejected_with_what_to_change(tmp_path):
    """fp16 needs a GPU; 4-bit/8-bit do not any more (tests/test_qlora.py trains them on the CPU)."""
    import torch

    from clinicalblip.errors import UserError
    from clinicalblip.train import train_stage

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    (tmp_path / "m.jsonl").write_text("")
    cfg = stage_config_from_dict({**BASE, "output_dir": str(tmp_path / "o"),
                                  "data": {"manifest": str(tmp_path / "m.jsonl")}}, ["model.dtype=fp16"])
    with pytest.raises(UserError, match="fp16 is not supported on CPU: use fp32"):
        train_stage(cfg)
