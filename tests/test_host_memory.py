"""Host memory: a bf16 stage loads in bf16 (frozen weights never exist in fp32), full-trained parts keep their
stored fp32 values, and a bf16 merge releases a checkpoint plain transformers loads with the chain's logits.

The full-depth numbers come from benchmarks/host_memory.py (README, "Host memory"); these tests prove the
mechanism on the tiny model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_stage_cfg

FROZEN_VISION_LM = {"trainable.vision_model": "frozen", "trainable.language_model": "frozen"}


class Fp32Created(TorchDispatchMode):
    """Counts the shapes of every fp32 tensor an op materialises (views and meta tensors hold no memory)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                    self.shapes[tuple(t.shape)] += 1
        return out


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _train_recording(monkeypatch, cfg) -> tuple[Path, Fp32Created, object]:
    """Train one stage, recording every fp32 tensor created while the model is loaded (train._load_model)."""
    import clinicalblip.train as train

    rec, built = Fp32Created(), {}
    load = train._load_model

    def recorded(*a, **k):
        with rec:
            built["b"] = load(*a, **k)
        return built["b"]

    monkeypatch.setattr(train, "_load_model", recorded)
    return train.train_stage(cfg), rec, built["b"].model


def _assert_frozen_never_fp32(rec: Fp32Created, model) -> None:
    frozen = {tuple(p.shape) for p in model.parameters() if not p.requires_grad}
    trainable = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    only_frozen = frozen - trainable  # shapes that no fp32 trainable tensor can explain
    emb = tuple(model.get_input_embeddings().weight.shape)
    assert emb in only_frozen and len(only_frozen) >= 5, only_frozen
    leaked = {s: n for s, n in rec.shapes.items() if s in only_frozen}
    assert not leaked, f"frozen-weight shapes materialised in fp32 while loading: {leaked}"
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad else torch.bfloat16
        assert p.dtype == want, (name, p.dtype)
    assert rec.shapes, "the recorder saw no fp32 tensor at all (the trainable ones must be fp32)"


@pytest.fixture(scope="module")
def bf16_chain_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("bf16chain")


def test_bf16_stages_never_materialise_frozen_weights_in_fp32(monkeypatch, synth_manifest, bf16_chain_dirs,
                                                               fresh_accelerate_state):
    # root stage: the tiny base is built in bf16 and saved so; the stage loads it back
    s1, rec1, model1 = _train_recording(monkeypatch, tiny_stage_cfg(
        "stage1.yaml", synth_manifest, bf16_chain_dirs / "stage1",
        **{"model.dtype": "bf16", "train.max_steps": 1, "data.val_max": 0, **FROZEN_VISION_LM}))
    _assert_frozen_never_fp32(rec1, model1)
    stored = load_file(str(s1 / "base" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # the base was never an fp32 model

    # child stage: the parent chain (merged) applied in bf16, the LLM LoRA on top
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    s2, rec2, model2 = _train_recording(monkeypatch, tiny_stage_cfg(
        "stage2.yaml", synth_manifest, bf16_chain_dirs / "stage2", parent=s1,
        **{"model.dtype": "bf16", "train.max_steps": 1, "data.val_max": 0, "lora.init": "gaussian"}))
    _assert_frozen_never_fp32(rec2, model2)
    assert any("lora_" in n for n, p in model2.named_parameters() if p.requires_grad)


def test_full_trained_parts_keep_their_stored_fp32_values(stage1_dir):
    from clinicalblip.model import load_pretrained, stored_dtype

    base = stage1_dir / "base"
    assert stored_dtype(str(base)) == "fp32"
    stored = load_file(str(base / "model.safetensors"))
    model, _ = load_pretrained(str(base), dtype="bf16", fp32_components=("qformer", "query_tokens"))
    params = dict(model.named_parameters())
    q = [k for k in params if k.startswith("qformer.")] + ["query_tokens"]
    for k in q:
        assert params[k].dtype == torch.float32 and torch.equal(params[k], stored[k]), k
    # ... which a bf16 round trip would not give
    assert not all(torch.equal(stored[k].bfloat16().float(), stored[k]) for k in q)
    lm = [k for k in params if k.startswith("language_model.")]
    assert lm and all(params[k].dtype == torch.bfloat16 for k in lm)


def test_bf16_merge_release_loads_in_plain_transformers_with_the_chains_logits(synth_manifest, bf16_chain_dirs,
                                                                               tmp_path):
    from transformers import InstructBlipForConditionalGeneration

    from clinicalblip.merge import _logits, _probe_batch, merge_stage_chain
    from clinicalblip.model import is_decoder_only
    from clinicalblip.stages import load_stage_model, load_template_of

    s2 = bf16_chain_dirs / "stage2"
    if not (s2 / "stage.json").is_file():
        pytest.skip("needs the bf16 chain of test_bf16_stages_never_materialise_frozen_weights_in_fp32")
    release = tmp_path / "release"
    info = merge_stage_chain(str(s2), str(release))  # no dtype: the base's stored dtype
    assert info["dtype"] == "bf16"
    assert json.loads((release / "clinicalblip.json").read_text())["dtype"] == "bf16"
    files = list(release.glob("*.safetensors"))
    assert files and all(t.dtype == torch.bfloat16 for f in files for t in load_file(str(f)).values())

    plain = InstructBlipForConditionalGeneration.from_pretrained(release, dtype="auto")
    assert plain.dtype == torch.bfloat16
    chain, processor, _ = load_stage_model(s2, dtype="bf16", keep_last_unmerged=True)
    assert any("lora_" in n for n, _ in chain.named_parameters())  # the live adapter chain
    probe = _probe_batch(processor, load_template_of(s2), is_decoder_only(plain), tmp_path)
    ref, got = _logits(chain, probe), _logits(plain, probe)
    scale = max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    assert diff <= 3e-2 * scale, (diff, scale)
    # the LoRA really changed the model (gaussian init): matching the chain is not matching the base
    base, _, _ = load_stage_model(bf16_chain_dirs / "stage1", dtype="bf16")
    assert (_logits(base, probe) - ref).abs().max().item() > 10 * diff


def test_merge_default_dtype_follows_an_fp32_base(stage2_dir, tmp_path):
    from clinicalblip.merge import merge_stage_chain

    info = merge_stage_chain(str(stage2_dir), str(tmp_path / "release"))
    assert info["dtype"] == "fp32" and info["max_abs_logit_diff"] <= 1e-3


def test_host_memory_benchmark_writes_one_row_per_step(tmp_path):
    """The benchmark's own plumbing on the tiny preset: one child per step, peaks and times in host_memory.json."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "host_memory.py"), "--preset", "tiny",
                           "--steps", "base,stage1", "--no-ranks", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "out" / "host_memory.json").read_text())
    assert [r["step"] for r in got["results"]] == ["base", "stage1", "write1"]
    assert all(r["ok"] and 0.1 < r["peak_rss_gib"] < 8 and r["wall_s"] >= 0 for r in got["results"])
    assert got["results"][0]["wall_s"] > 1  # a child process: imports and the build at least
    n = got["parameters"]
    assert got["weights_gib"] == round(n * 4 / 2**30, 3)  # the tiny stage trains in fp32
    assert (tmp_path / "work" / "stage1" / "stage.json").is_file()


@pytest.mark.distributed
def test_zero3_root_stage_loads_partitioned_and_trains_like_one_process(synth_manifest, tmp_path):
    """A root stage under ZeRO-3 loads its base under zero.Init (each rank 1/N of it) and trains the same stage
    as one process: LoRA (seeded after loading), full components and the trainable report all equal."""
    import yaml
    from launch import LAUNCHERS, REPO, losses, max_diff, train, weights

    data = yaml.safe_load((REPO / "configs" / "tiny" / "stage2.yaml").read_text())
    data.pop("parent", None)
    data.setdefault("model", {})["base"] = "tiny"
    cfg = tmp_path / "root.yaml"
    cfg.write_text(yaml.safe_dump(data))
    common = [f"data.manifest={synth_manifest}", "data.val_max=0", "data.context_dropout=0.0", "train.log_every=1",
              "optim.schedule=constant", "optim.warmup_ratio=0", "lora.init=gaussian", "lora.language_model.dropout=0",
              "train.seed=1", "train.max_steps=2", "optim.max_grad_norm=0"]
    one = train([cfg, f"output_dir={tmp_path / 'one'}", "train.batch_size=4", *common])
    assert one.returncode == 0, one.stderr[-3000:]
    z3 = train([cfg, f"output_dir={tmp_path / 'z3'}", "train.batch_size=2", *common], launcher=LAUNCHERS["zero3"])
    assert z3.returncode == 0, z3.stderr[-3000:]
    assert "DeepSpeed ZeRO-3" in z3.stdout
    loaded = [line for line in z3.stdout.splitlines() if "base loaded partitioned" in line]
    assert len(loaded) == 1, z3.stdout[-2000:]  # logged once, by the main process
    sharded, total = map(int, loaded[0].split("zero.Init), ")[1].split(" tensors")[0].split(" of "))
    assert sharded > 0.5 * total  # the base's tensors (the new LoRA ones are partitioned by deepspeed later)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "z3")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    got = weights(tmp_path / "z3")
    assert all(t.numel() > 0 for t in got.values()) and max_diff(got, weights(tmp_path / "one")) <= 1e-5
    info = [json.loads((tmp_path / d / "stage.json").read_text())["trainable"] for d in ("one", "z3")]
    assert info[0] == info[1] and info[1]["total"]["frozen"] > 0  # counted from ds_numel, not 0-size shards
    # bf16: the partitioned bf16 base and the new (fp32) LoRA weights end in one dtype for DeepSpeed's groups
    bf = train([cfg, f"output_dir={tmp_path / 'z3bf16'}", "train.batch_size=2", "model.dtype=bf16", *common],
               launcher=LAUNCHERS["zero3"])
    assert bf.returncode == 0, bf.stderr[-3000:]
    assert "base loaded partitioned" in bf.stdout and len(losses(tmp_path / "z3bf16")) == 2
