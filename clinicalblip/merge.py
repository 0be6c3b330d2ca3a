"""Merge a stage chain into one release folder that plain `transformers` loads, verified on a probe batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from peft import PeftModel

from clinicalblip import __version__
from clinicalblip.data.collate import StudyCollator, model_inputs
from clinicalblip.errors import UserError
from clinicalblip.filemode import give_umask_mode
from clinicalblip.model import is_builtin, is_decoder_only, require_hub_online, stored_dtype, torch_dtype
from clinicalblip.release import RELEASE_FORMAT, RELEASE_META, is_release_dir, write_release_files
from clinicalblip.stages import (
    StageError,
    base_location,
    is_stage_dir,
    load_stage_model,
    load_template_of,
    stage_chain,
)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _probe_batch(processor, template, decoder_only: bool, tmp: Path) -> dict:
    """Two studies (two views and one view) of seeded noise images with a short report: a fixed probe."""
    rng = np.random.default_rng(1234)
    size = processor.image_processor.size
    h, w = size.get("height", 224), size.get("width", 224)
    paths = []
    for i in range(3):
        p = tmp / f"probe{i}.png"
        Image.fromarray((rng.random((h, w)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    records = [
        {"id": "probe-a", "images": [{"path": paths[0], "view": "PA"}, {"path": paths[1], "view": "LATERAL"}],
         "indication": "Shortness of breath.", "findings": "The heart is enlarged. No pleural effusion.",
         "impression": "Cardiomegaly."},
        {"id": "probe-b", "images": [{"path": paths[2], "view": "PA"}], "indication": None,
         "findings": "The lungs are clear.", "impression": "Normal."},
    ]
    collate = StudyCollator(processor=processor, template=template, num_query_tokens=processor.num_query_tokens,
                            decoder_only=decoder_only, mode="train")
    return model_inputs(collate(records))


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    inputs = dict(batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return model(**inputs).logits.float()


def _model_card(chain: list[dict], meta: dict, dtype: str) -> str:
    root = chain[0]
    base = root["base"]
    base_name = base.get("name") or base.get("path")
    tiny = is_builtin(base_name)
    licence = (f"Apache-2.0 (random-weight {base_name} model built by clinicalblip)" if tiny else
               "inherits the base model's licence: Vicuna-based InstructBLIP follows the LLaMA/Vicuna terms "
               "(non-commercial); Flan-T5-based InstructBLIP is MIT/Apache-2.0 — check the base model card")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags: [radiology, report-generation, instructblip, clinicalblip]", "---", "",
        f"# Radiology report generation — merged from {len(chain)} clinicalblip stage(s)", "",
        "A single `InstructBlipForConditionalGeneration` checkpoint with every stage's LoRA and fully trained "
        "modules folded into the base weights. Loads with plain `transformers`:", "",
        "```python",
        "from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor",
        "model = InstructBlipForConditionalGeneration.from_pretrained(PATH)",
        "processor = InstructBlipProcessor.from_pretrained(PATH)",
        "inputs = processor(images=image, text=prompt, return_tensors='pt')  # prompt: see prompts/",
        "out = model.generate(**inputs, max_new_tokens=128)",
        "# a decoder-only LLM (Vicuna) returns the prompt + the report: decode only the new tokens",
        "new = out[:, inputs['input_ids'].shape[1]:] if model.config.use_decoder_only_language_model else out",
        "report = processor.batch_decode(new, skip_special_tokens=True)[0]",
        "```", "",
        "Multi-view studies: give each view as one row of `pixel_values` and put `num_views x num_query_tokens` "
        "image tokens before the prompt (clinicalblip's `generate` does this).", "",
        "## Base model", "", f"- `{base_name}` (fingerprint `{base.get('fingerprint')}`)", "",
        "## Stages", "", "| stage | template | trainable parts | val loss | data hash |", "| --- | --- | --- | --- | --- |",
    ]
    for st in chain:
        parts = ", ".join(f"{c}: {r['policy']}" for c, r in st.get("trainable", {}).items()
                          if c != "total" and r.get("policy") != "frozen")
        vl = st.get("metrics", {}).get("val_loss")
        lines.append(f"| {st['name']} | {st.get('template')} | {parts} | "
                     f"{'' if vl is None else round(vl, 4)} | {st.get('data_hash')} |")
    lines += ["", "## Evaluation", ""]
    ev = meta.get("eval")
    if ev:
        lines += _eval_section(ev, meta.get("eval_source") or {})
    else:
        lines += ["No evaluation was attached (`clinicalblip merge ... --metrics metrics.json` adds one).", ""]
    lines += [
        "## Verification", "",
        f"After merging, the release reloaded from disk and the adapter chain ran the same probe batch: max |logit "
        f"difference| = {meta['verification']['max_abs_logit_diff']:.3g} (tolerance "
        f"{meta['verification']['tolerance']:.3g}, dtype {dtype})."
        + ("" if "max_abs_logit_diff_vs_trained" not in meta["verification"] else
           f" The last stage was trained on a {meta['verification']['trained_quantization']} quantized language "
           f"model (QLoRA); the release folds its adapter into the unquantized base, and differs from the "
           f"quantized chain it was trained as by max |logit difference| = "
           f"{meta['verification']['max_abs_logit_diff_vs_trained']:.3g}."), "",
        "## Intended use and limitations", "",
        "Research on radiology report generation. Not a medical device: generated reports can be wrong, "
        "omit findings or invent them, and must not be used for diagnosis without review by a radiologist. "
        "Performance outside the training data's population, views and report style is unknown.",
        "" if not tiny else f"This checkpoint started from random weights ({base_name}, built by clinicalblip); "
        "it is only useful for testing the pipeline.", "",
        "## Licence", "", licence, "",
        f"Made with clinicalblip {__version__}.", "",
    ]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def _eval_section(ev: dict, source: dict) -> list[str]:
    """The card's evaluation: what was scored (data, split, n, protocol, labeler) and each metric with its 95% CI."""
    prov = ev.get("provenance") or {}
    clinical = ev.get("clinical") or {}
    lines = []
    if source.get("verified"):
        lines.append(f"Scored on the predictions of {source['model']} (model hash `{prov.get('model_hash')}`, "
                     "checked against this chain when merging).")
    else:
        lines.append(f"**Not verified:** {source.get('reason', 'these numbers were attached without a check')}. "
                     "They were attached with `--force-metrics` and may belong to another model or data.")
    lines += ["", "| what | value |", "| --- | --- |"]
    manifest = Path(prov["manifest"]).name if prov.get("manifest") else None  # the name: no local paths in a card
    for label, value in (("manifest", manifest), ("dataset (manifest hash)", prov.get("manifest_hash")),
                         ("split", prov.get("split")), ("studies (n)", ev.get("n")),
                         ("empty references skipped", ev.get("empty_references")),
                         ("template", prov.get("template")), ("decoding", prov.get("decoding")),
                         ("NLG protocol", ev.get("protocol")), ("clinical labeler", clinical.get("labeler")),
                         ("uncertain labels count as", clinical.get("uncertain_as")),
                         ("95% CIs", ev.get("nlg_ci95_method") or ("bootstrap" if clinical.get("bootstrap") else None))):
        if value not in (None, ""):
            lines.append(f"| {label} | {json.dumps(value) if isinstance(value, dict) else value} |")
    lines += ["", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    cis = ev.get("nlg_ci95") or {}
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        if k in ev:
            ci = cis.get(k)
            lines.append(f"| {k} | {_fmt(ev[k])} | {f'{_fmt(ci[0])} - {_fmt(ci[1])}' if ci else 'n/a'} |")
    macro = clinical.get("macro") or {}
    if "clinical_macro_f1" in ev:
        ci = macro.get("f1_ci95")
        n_labels = len(clinical.get("observations") or [])
        lines.append(f"| clinical macro F1 ({n_labels} labels) | {_fmt(ev['clinical_macro_f1'])} | "
                     f"{f'{_fmt(ci[0])} - {_fmt(ci[1])}' if ci else 'n/a'} |")
    return lines + [""]


def read_eval_metrics(path: str, chain: list[dict], force: bool = False) -> tuple[dict, dict]:
    """(metrics, source) of a `clinicalblip eval` metrics.json for the card, checked against the chain.

    Refused unless its provenance.model_hash is the hash of a stage of this chain (the hash generate records),
    or force is set; `source` says which stage it belongs to, or why it was not verified.
    """
    from clinicalblip.generate import _dir_hash
    from clinicalblip.metrics.evaluate_predictions import read_metrics_file

    try:
        ev = read_metrics_file(path)
    except UserError as exc:
        raise UserError(f"--metrics {exc}") from None
    force_hint = "pass --force-metrics to attach it anyway (the card then says it was not verified)"
    model_hash = (ev.get("provenance") or {}).get("model_hash") if isinstance(ev.get("provenance"), dict) else None
    if not model_hash:
        reason = f"{path} has no provenance.model_hash, so its numbers cannot be tied to this chain"
        if not force:
            raise UserError(f"--metrics {reason} (evaluate predictions written by `clinicalblip generate`); {force_hint}")
        return ev, {"verified": False, "reason": reason}
    hashes = {_dir_hash(st["dir"]): st for st in chain}
    st = hashes.get(model_hash)
    if st is None:
        names = ", ".join(f"{s['name']} {h}" for h, s in hashes.items())
        reason = f"{path} scores model hash {model_hash}, which is no stage of this chain ({names})"
        if not force:
            raise UserError(f"--metrics {reason}: another model's numbers; {force_hint}")
        return ev, {"verified": False, "reason": reason}
    last = st is chain[-1]
    model = f"stage '{st['name']}'" + ("" if last else " (an EARLIER stage of this chain, not the merged last stage)")
    return ev, {"verified": True, "model": model, "stage": st["name"], "last_stage": last}


def _stage_quantization(chain: list[dict]) -> str:
    """The quantization the last stage trained with ('none' when it trained in full precision)."""
    cfg_path = Path(chain[-1]["dir"]) / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    return (cfg.get("model") or {}).get("quantization", "none")


def _max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |difference|; NaN when either side is not finite (NaN > tol is False: it must never pass)."""
    if not (torch.isfinite(got).all() and torch.isfinite(ref).all()):
        return float("nan")
    return (got - ref).abs().max().item()


def merge_stage_chain(stage_dir: str, out: str, dtype: str | None = None, tolerance: float | None = None,
                      max_shard_size: str = "2GB", metrics: str | None = None,
                      push_to_hub: str | None = None, force_metrics: bool = False) -> dict:
    """Fold every stage of the chain into the base weights, write + verify the release.

    `dtype` None releases in the dtype the base checkpoint is stored in (fp32 when unknown). The chain is
    loaded in that dtype and merged in place, module by module: peak host RAM stays near one copy of the
    release (a bf16 7B merges in about 16 GB, not the 32 GB of an fp32 copy). The verification compares the
    release with the adapter chain in the same dtype.

    The release is assembled in a temporary sibling of `out` and renamed into place only once its reloaded
    logits match the adapter chain: a failed merge leaves nothing at `out` (an earlier release stays).
    A chain whose last stage trained on a quantized (QLoRA) model is folded into the unquantized base, as
    peers do; both differences are recorded: against the unquantized chain (verified) and against the chain
    as it was trained (quantized; reported, not a pass/fail check).
    """
    t0 = time.perf_counter()
    if push_to_hub:
        require_hub_online(f"--push-to-hub {push_to_hub}")  # before minutes of merging, not after
    if is_release_dir(stage_dir):
        return {"status": "noop", "message": f"{stage_dir} is already a merged release; nothing to do"}
    if not is_stage_dir(stage_dir):
        raise StageError(f"{stage_dir}: not a stage folder (no stage.json)")
    if dtype is not None and dtype not in BYTES:
        raise UserError(f"--dtype must be one of {', '.join(BYTES)}")
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        if not (out_path / RELEASE_META).is_file():
            raise UserError(f"{out}: exists and is not an earlier release; choose an empty folder")
    chain = stage_chain(stage_dir)
    if dtype is None:
        dtype = stored_dtype(base_location(chain)) or "fp32"
    eval_metrics = read_eval_metrics(metrics, chain, force_metrics) if metrics else None  # before minutes of work
    template = load_template_of(stage_dir)
    quantization = _stage_quantization(chain)

    # The adapter chain: every stage merged but the last, whose LoRA stays live.
    chain_model, processor, chain = load_stage_model(stage_dir, dtype=dtype, keep_last_unmerged=True)
    n_params = sum(p.numel() for n, p in chain_model.named_parameters() if "lora_" not in n)
    need = int(n_params * BYTES[dtype] * 1.1)
    target_parent = out_path.parent
    target_parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target_parent).free
    if free < need:
        raise UserError(f"not enough disk in {target_parent}: the release needs ~{need / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")
    tmp_out = target_parent / f".{out_path.name}.merging"
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = _probe_batch(processor, template, is_decoder_only(chain_model), Path(tmp))
            ref = _logits(chain_model, probe)
            merged = chain_model.merge_and_unload() if isinstance(chain_model, PeftModel) else chain_model
            leftovers = [n for n, _ in merged.named_parameters() if "lora_" in n]
            if leftovers:
                raise StageError(f"merge left LoRA parameters behind (e.g. {leftovers[0]})")
            merged = merged.to(torch_dtype(dtype))
            gen_cfg = merged.generation_config
            cfg_path = Path(stage_dir) / "config.yaml"
            stage_cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
            gen_cfg.max_new_tokens = int(stage_cfg.get("data", {}).get("max_report_tokens", 128))
            gen_cfg.num_beams, gen_cfg.do_sample = 1, False
            gen_cfg.pad_token_id = processor.tokenizer.pad_token_id
            gen_cfg.eos_token_id = processor.tokenizer.eos_token_id
            tmp_out.mkdir(parents=True)
            merged.save_pretrained(tmp_out, max_shard_size=max_shard_size, safe_serialization=True)
            processor.save_pretrained(tmp_out)
            give_umask_mode(tmp_out)  # safetensors writes 0600; a release must load for other users too
            del merged, chain_model

            # Verify what was written, not what is in memory: reload the release with plain transformers.
            from transformers import InstructBlipForConditionalGeneration

            reloaded = InstructBlipForConditionalGeneration.from_pretrained(tmp_out, dtype=torch_dtype(dtype))
            got = _logits(reloaded, probe)
            diff = _max_diff(got, ref)
            scale = max(1.0, ref.abs().max().item()) if torch.isfinite(ref).all() else 1.0
            # Half precision: the live adapter and the merged weights round differently (a LoRA delta below one
            # bf16 step of its weight is lost in the merge), and 8 mantissa bits of noise per layer add up: at
            # full-depth shape-vicuna7b two such bf16 forwards differ by 3.1% of max |logit| (0.199 at 6.4).
            tol = tolerance if tolerance is not None else (1e-3 if dtype == "fp32" else 6e-2 * scale)
            del reloaded
            trained_diff = None
            if quantization != "none":
                as_trained, _, _ = load_stage_model(stage_dir, dtype="bf16", quantization=quantization)
                trained_diff = _max_diff(got, _logits(as_trained, probe))
                del as_trained
        if not diff <= tol:  # NaN fails too
            what = "non-finite logits (NaN/Inf)" if math.isnan(diff) else f"logits that differ by {diff:.3g}"
            raise StageError(f"verification failed: the release reloaded from disk gives {what} against the adapter "
                             f"chain (tolerance {tol:.3g}); nothing was written to {out}. Check the stages for "
                             "NaN weights (clinicalblip generate on the last stage) or merge with --dtype fp32")
        verification = {"max_abs_logit_diff": diff, "tolerance": tol, "probe_studies": 2,
                        "against": f"the adapter chain, unquantized, in {dtype}"}
        if trained_diff is not None:
            verification.update(trained_quantization=quantization, max_abs_logit_diff_vs_trained=trained_diff)
        meta = {
            "format": RELEASE_FORMAT, "code_version": __version__, "template": template.name,
            "max_views": int(stage_cfg.get("data", {}).get("max_views", 2)),
            "max_prompt_tokens": int(stage_cfg.get("data", {}).get("max_prompt_tokens", 256)),
            # what the model takes of the prior study (generation refuses other input, naming data.prior)
            "prior": str(stage_cfg.get("data", {}).get("prior", "none")),
            "max_prior_views": int(stage_cfg.get("data", {}).get("max_prior_views", 1)),
            "dtype": dtype, "base": chain[0]["base"],
            # stage folders relative to the release (as stage.json names its parent): no local absolute paths
            "stages": [{"name": s["name"], "dir": os.path.relpath(s["dir"], out_path.resolve()),
                        "trainable": s.get("trainable"),
                        "template": s.get("template"), "metrics": s.get("metrics"), "data_hash": s.get("data_hash")}
                       for s in chain],
            "verification": verification,
        }
        if eval_metrics:
            meta["eval"], meta["eval_source"] = eval_metrics
        write_release_files(tmp_out, template, meta, _model_card(chain, meta, dtype))
        if out_path.exists():
            old = target_parent / f".{out_path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_path, old)
            os.replace(tmp_out, out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_out, out_path)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    size = sum(f.stat().st_size for f in out_path.glob("*.safetensors"))
    info = {"status": "merged", "release_dir": str(out_path), "stages": [s["name"] for s in chain], "dtype": dtype,
            "max_abs_logit_diff": diff, "tolerance": tol, "weights_bytes": size,
            "seconds": round(time.perf_counter() - t0, 2)}
    if trained_diff is not None:
        info["max_abs_logit_diff_vs_trained"] = trained_diff
    if push_to_hub:
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=push_to_hub, folder_path=str(out_path), repo_type="model")
        info["pushed_to"] = push_to_hub
    return info
