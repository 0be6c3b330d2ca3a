"""The decode path (clinicalblip/decode.py): token-for-token equal to transformers `generate` for greedy and beam
search, LLaMA- and T5-style, batch 1 and mixed-length batches; sampling seeded; fallbacks and refusals named."""

from __future__ import annotations

import pytest
import torch

from clinicalblip.data.collate import model_inputs
from clinicalblip.data.manifest import read_manifest
from clinicalblip.decode import Decoder, decoder_for, refuse_compile_reason, resolve
from clinicalblip.generate import ReportModel
from clinicalblip.model import build_base
from clinicalblip.prompts import load_template

_MODELS: dict = {}


def _setup(base: str, layers: int = 0):
    key = (base, layers)
    if key not in _MODELS:
        torch.manual_seed(0)
        model, proc = build_base(base, layers=layers)
        model.eval()
        # Random towers write near-constant text (tiny-t5: only <pad>; tied to the input embeddings, a token
        # repeats itself): an untied head of wider random weights makes the text vary with the context.
        head = model.language_model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
        _MODELS[key] = ReportModel(model=model, processor=proc, template=load_template("findings_with_context"),
                                   model_dir="test")
    return _MODELS[key]


def _inputs(rm, records, n):
    inp = model_inputs(rm.collator()(records[:n]))
    if n > 1:  # a mixed-length batch: some rows are padded
        assert bool((inp["attention_mask"] == 0).any())
    return inp


def _hf(rm, inp, **kw):
    with torch.no_grad():
        out = rm.model.generate(**inp, do_sample=kw.pop("do_sample", False), **kw)
    start = 1 if not rm.decoder_only else inp["input_ids"].shape[1]
    return out[:, start:]


@pytest.fixture(scope="module")
def records(synth_manifest):
    recs = read_manifest(synth_manifest, split="test")
    # studies whose prompts differ in length (indication present or not) so that batches are padded
    return sorted(recs, key=lambda r: len(r.get("indication") or ""))[::-1][:2] + \
        sorted(recs, key=lambda r: len(r.get("indication") or ""))[:2]


@pytest.mark.parametrize("base", ["tiny", "tiny-t5"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("beams", [1, 3])
def test_same_tokens_as_generate(base, batch, beams, records):
    rm = _setup(base)
    inp = _inputs(rm, records, batch)
    hf = _hf(rm, inp, max_new_tokens=12, num_beams=beams)
    ours = Decoder(rm.model).generate(inp, max_new_tokens=12, num_beams=beams)
    assert len(set(hf.flatten().tolist())) > 3  # real text, not one token repeated
    assert torch.equal(hf, ours)


@pytest.mark.parametrize("base", ["tiny", "tiny-t5"])
@pytest.mark.parametrize("beams", [1, 2])
def test_eos_finishes_rows_at_different_steps(base, beams, records):
    """Random weights rarely emit EOS: declare a token the model does emit as EOS, so rows stop early and at
    different steps (padding after EOS, finished beam hypotheses, early stop)."""
    rm = _setup(base)
    inp = _inputs(rm, records, 4)
    free = _hf(rm, inp, max_new_tokens=12, num_beams=beams)
    for eos in free[1, 2:10].tolist():  # a token that, declared EOS, ends some row early
        hf = _hf(rm, inp, max_new_tokens=12, num_beams=beams, eos_token_id=eos)
        if (hf == eos).any():
            break
    ours = Decoder(rm.model).generate(inp, max_new_tokens=12, num_beams=beams, eos_token_id=eos)
    assert (hf == eos).any()
    assert torch.equal(hf, ours)


@pytest.mark.parametrize("base", ["tiny", "tiny-t5"])
def test_repetition_penalty_and_min_new_tokens_match(base, records):
    rm = _setup(base)
    inp = _inputs(rm, records, 4)
    free = _hf(rm, inp, max_new_tokens=10)
    eos = int(free[0, 2])
    for kw in ({"repetition_penalty": 1.5}, {"min_new_tokens": 6, "eos_token_id": eos},
               {"repetition_penalty": 1.3, "num_beams": 2}):
        hf = _hf(rm, inp, max_new_tokens=10, **kw)
        ours = Decoder(rm.model).generate(inp, max_new_tokens=10, **kw)
        assert torch.equal(hf, ours), kw
    # the penalty changes what greedy writes (so the comparison above is not trivially equal)
    assert not torch.equal(free, _hf(rm, inp, max_new_tokens=10, repetition_penalty=1.5))


def test_sampling_is_seeded_and_repeatable(records):
    rm = _setup("tiny")
    inp = _inputs(rm, records, 4)
    dec = Decoder(rm.model)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95)
    a = dec.generate(inp, seed=1, **kw)
    assert torch.equal(a, dec.generate(inp, seed=1, **kw))
    assert not torch.equal(a, dec.generate(inp, seed=2, **kw))
    assert not torch.equal(a, dec.generate(inp, max_new_tokens=12))  # it does sample
    # top_p so small that only the most likely token survives: sampling collapses to greedy
    assert torch.equal(dec.generate(inp, max_new_tokens=12, do_sample=True, top_p=1e-6, seed=3),
                       dec.generate(inp, max_new_tokens=12))


def test_unimplemented_settings_go_to_generate_with_a_reason(records):
    rm = _setup("tiny")
    inp = _inputs(rm, records, 2)
    dec = Decoder(rm.model)
    out = dec.generate(inp, max_new_tokens=8, no_repeat_ngram_size=2)
    assert "no_repeat_ngram_size" in dec.fallback_reason
    assert torch.equal(out, _hf(rm, inp, max_new_tokens=8, no_repeat_ngram_size=2))
    settings, reason = resolve(rm.model.language_model, {"max_new_tokens": 4, "num_beams": 2, "do_sample": True})
    assert settings is None and "beam sampling" in reason


def test_report_model_uses_the_decode_path_and_writes_what_generate_writes(records):
    rm = _setup("tiny")
    batch = rm.collator()(records[:4])
    fast = rm.generate_batch(batch, max_new_tokens=10, num_beams=2)
    assert rm.model.__dict__["_clinicalblip_decoder"] is decoder_for(rm.model)
    rm.decode = "hf"
    try:
        assert rm.generate_batch(batch, max_new_tokens=10, num_beams=2) == fast
    finally:
        rm.decode = "fast"


def test_quantized_models_refuse_compile_with_a_reason():
    class Fake(torch.nn.Module):
        is_loaded_in_4bit = True

    assert "bitsandbytes" in refuse_compile_reason(Fake())
    assert refuse_compile_reason(_setup("tiny").model) == ""


@pytest.mark.slow
@pytest.mark.parametrize("base", ["shape-vicuna7b", "shape-flant5xl"])
def test_shape_presets_same_tokens(base, records):
    """The real widths, vocabularies and special ids at one layer per tower (minutes on a CPU)."""
    rm = _setup(base, layers=1)
    try:
        for batch, beams in ((1, 1), (4, 1), (4, 3)):
            inp = _inputs(rm, records, batch)
            hf = _hf(rm, inp, max_new_tokens=8, num_beams=beams)
            assert torch.equal(hf, Decoder(rm.model).generate(inp, max_new_tokens=8, num_beams=beams))
    finally:
        _MODELS.pop((base, 1), None)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-t5"])
def test_compiled_step_same_tokens(base, records):
    """torch.compile of the step on full static buffers (batch and length buckets) writes the same tokens."""
    rm = _setup(base)
    inp = _inputs(rm, records, 3)  # 3 rows: the batch bucket pads to 4
    dec = Decoder(rm.model, compile=True)
    for beams in (1, 2):
        hf = _hf(rm, inp, max_new_tokens=10, num_beams=beams)
        assert torch.equal(hf, dec.generate(inp, max_new_tokens=10, num_beams=beams))
    assert dec.first_call_s is not None and dec.first_call_s > 0


@pytest.mark.parametrize("base,quant", [("tiny", "4bit"), ("tiny-t5", "8bit")])
def test_quantized_language_models_decode_the_same_tokens_eagerly(base, quant, records):
    """bitsandbytes layers run in the static-cache loop as modules (same tokens as generate, bf16); compile is
    refused for them, with the reason kept on the decoder."""
    pytest.importorskip("bitsandbytes")
    from clinicalblip.model import quantize_from_model

    model, proc = build_base(base, dtype="bf16")
    head = model.language_model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1))
                                     .to(torch.bfloat16))
    qm = quantize_from_model(model, quant, "bf16").eval()
    rm = ReportModel(model=qm, processor=proc, template=load_template("findings_with_context"), model_dir="q")
    inp = _inputs(rm, records, 3)
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    dec = Decoder(qm, compile=True)
    assert not dec.compile and "bitsandbytes" in dec.compile_refused
    for beams in (1, 2):
        hf = _hf(rm, inp, max_new_tokens=10, num_beams=beams)
        assert torch.equal(hf, dec.generate(inp, max_new_tokens=10, num_beams=beams))


def test_decode_speed_benchmark_rows_follow_the_schema(records, tmp_path):
    """benchmarks/decode_speed.py's measuring core on the tiny model: one row per batch, the issue's keys."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_speed.py"
    spec = importlib.util.spec_from_file_location("decode_speed", path)
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    rm = _setup("tiny")
    rows = ds.bench("tiny", rm, records, [1, 2], 3, 1, 4, 6, False, "cpu")
    assert [r["batch"] for r in rows] == [1, 2] and rows[0]["same_tokens"] == "4/4"
    for r in rows:
        assert r["hf_ms_per_token"] > 0 and r["ours_ms_per_token"] > 0
        assert r["speedup"] == round(r["hf_ms_per_token"] / r["ours_ms_per_token"], 2) or abs(
            r["speedup"] - r["hf_ms_per_token"] / r["ours_ms_per_token"]) < 0.02
    out = ds.write(rows, tmp_path, {"mode": "cpu"})
    data = json.loads(out.read_text())
    assert {"model", "batch", "hf_ms_per_token", "ours_ms_per_token", "speedup", "same_tokens"} <= set(data["results"][0])
    assert "| tiny | 1 | eager |" in ds.table(rows)
