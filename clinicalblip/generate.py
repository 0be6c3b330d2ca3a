"""Generation: one study (images + clinical context) or a whole manifest split, from a stage or release folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from clinicalblip.progress import progress

from clinicalblip import __version__
from clinicalblip.data.cache import find_image_cache, pixel_source
from clinicalblip.data.collate import StudyCollator, model_inputs, ordered_images
from clinicalblip.data.loader import make_loader
from clinicalblip.data.manifest import file_hash, read_manifest
from clinicalblip.errors import UserError
from clinicalblip.model import is_decoder_only, load_pretrained
from clinicalblip.priorinput import note_unused_priors, prior_mode_for, prior_row_fields
from clinicalblip.prompts import GENERIC_INDICATION, Template, load_template, target_text
from clinicalblip.release import is_release_dir, read_release, release_template
from clinicalblip.stages import is_stage_dir, load_stage_model, load_template_of

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_PROMPT_TOKENS = 256


@dataclass
class ReportModel:
    """A loaded model with everything needed to write reports: load once, call many times."""

    model: object
    processor: object
    template: Template
    model_dir: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_views: int = 2
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    decode: str = "fast"  # fast: clinicalblip.decode (static cache); hf: plain transformers generate
    compile: bool = False  # torch.compile the decoding step (decode="fast" only)
    prior: str = "none"  # what the model takes of the prior study (data.prior): none | report | images | both
    max_prior_views: int = 1

    @classmethod
    def load(cls, model_dir: str, dtype: str = "fp32", device: str | None = None,
             quantization: str = "none") -> "ReportModel":
        """Load a stage folder (the whole chain, merged) or a release folder.

        quantization 4bit | 8bit loads the language model through bitsandbytes (GPU or CPU), like peers'
        --load-4bit; a stage is then loaded as its QLoRA training saw it (its LoRA live on the quantized chain).
        """
        path = Path(model_dir)
        if not path.exists():
            raise UserError(f"model folder not found: {model_dir}")
        if quantization != "none" and dtype == "fp32":
            dtype = "bf16"  # bitsandbytes computes in bf16
        if is_stage_dir(path):
            model, processor, _ = load_stage_model(path, dtype=dtype, quantization=quantization)
            template = load_template_of(path)
            cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
            max_new = int(cfg.get("data", {}).get("max_report_tokens", DEFAULT_MAX_NEW_TOKENS))
            max_views = int(cfg.get("data", {}).get("max_views", 2))
            max_prompt = int(cfg.get("data", {}).get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS))
            prior_cfg = cfg.get("data", {})
        elif is_release_dir(path):
            model, processor = load_pretrained(str(path), dtype=dtype, quantization=quantization)
            meta = read_release(path)
            template = release_template(path, meta) or load_template("findings_with_context")
            max_new = int(getattr(model.generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)
            max_views = int(meta.get("max_views", 2))
            max_prompt = int(meta.get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS))
            prior_cfg = meta
        else:
            raise UserError(f"{model_dir}: neither a stage folder (stage.json) nor a release folder (config.json)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        rm = cls(model=model, processor=processor, template=template, model_dir=str(path),
                 max_new_tokens=max_new, max_views=max_views, max_prompt_tokens=max_prompt,
                 prior=str(prior_cfg.get("prior") or "none"), max_prior_views=int(prior_cfg.get("max_prior_views", 1)))
        rm.collator().check_image_tokens(model.config)  # before any weights move or any study is generated
        if quantization == "none":  # bitsandbytes models are placed by their device_map
            model.to(device)
        model.eval()
        return rm

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def decoder_only(self) -> bool:
        return is_decoder_only(self.model)

    def collator(self, template: Template | None = None, indication: str = "real",
                 blank_images: bool = False, prior: str | None = None) -> StudyCollator:
        return _generation_collator(self, template, indication, blank_images, prior)

    def front(self) -> "ModelFront":
        """Everything but the weights, picklable: what a server process needs to validate and preprocess studies
        while the model itself lives in a worker process."""
        m = self.model
        quant = "4bit" if getattr(m, "is_loaded_in_4bit", False) else "8bit" if getattr(m, "is_loaded_in_8bit", False) \
            else "none"
        return ModelFront(processor=self.processor, template=self.template, model_dir=self.model_dir,
                          max_new_tokens=self.max_new_tokens, max_views=self.max_views,
                          max_prompt_tokens=self.max_prompt_tokens, decoder_only=self.decoder_only,
                          prior=self.prior, max_prior_views=self.max_prior_views,
                          runtime={"dtype": _dtype_name(m.dtype), "device": str(self.device), "quantization": quant})

    @torch.no_grad()
    def generate_batch(self, batch: dict, max_new_tokens: int | None = None, num_beams: int = 1, **kw) -> list[str]:
        inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
        if inputs["pixel_values"].dtype != self.model.dtype:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if self.decode == "fast":
            from clinicalblip.decode import decoder_for

            out = decoder_for(self.model, self.compile).generate(
                inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, num_beams=num_beams, **kw)
            return [t.strip() for t in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
        kw.pop("seed", None)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, num_beams=num_beams,
            do_sample=kw.pop("do_sample", False), **kw,
        )
        if is_decoder_only(self.model) and out.shape[1] > inputs["input_ids"].shape[1]:
            out = out[:, inputs["input_ids"].shape[1]:]  # generate returns prompt + new tokens
        texts = self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def report(self, images: list[str], indication: str | None = None, history: str | None = None,
               comparison: str | None = None, views: list[str] | None = None, template: str | None = None,
               max_new_tokens: int | None = None, num_beams: int = 1, context: str = "real",
               age=None, sex: str | None = None, hints=None, prior: dict | None = None,
               **generate_kwargs) -> dict:
        """One study: image paths (one per view) + clinical context -> {prompt, qformer_prompt, report, ...}.

        views: one per image (None / "" for unknown: a DICOM's ViewPosition, if any). indication, history,
        comparison, age, sex and hints fill the template's slots exactly as the training collator fills them
        from a manifest record (study.py), so the prompt equals the training prompt of the same study.
        context: real | none (indication left out) | generic (replaced) | blank_image, as in generate_split;
        'shuffled' needs other studies and is refused. Decoding settings are checked as the server checks them.
        prior: the previous study, {"images": [paths], "views": [...], "report": text, "study_date" or
        "interval_days"}; refused (naming data.prior) when the model does not take what it holds.
        """
        from clinicalblip.data.images import dicom_view_position
        from clinicalblip.study import check_decoding, check_views, study_record

        if context not in CONTEXT_MODES:
            raise UserError(f"unknown context mode '{context}' (known: {', '.join(CONTEXT_MODES)})")
        if context == "shuffled":
            raise UserError("--context shuffled gives each study another study's indication: it needs a manifest "
                            "split (--manifest), not one study (--image)")
        tpl = load_template(template) if template else self.template
        views = check_views(len(images or []), views, self.max_views)
        views = [v or dicom_view_position(p) for v, p in zip(views, images)]
        decoding = check_decoding(num_beams, max_new_tokens, default_max_new_tokens=self.max_new_tokens,
                                  **generate_kwargs)
        record = study_record(images, views, {"indication": indication, "history": history,
                                              "comparison": comparison, "age": age, "sex": sex, "hints": hints})
        if prior:
            from clinicalblip.priorinput import attach_prior

            attach_prior(record, prior, self.prior)
            if len(record["prior"]["images"]) > self.max_prior_views:
                raise UserError(f"{len(record['prior']['images'])} prior images given; this model was trained with "
                                f"data.max_prior_views={self.max_prior_views}")
        collate = self.collator(tpl, indication="real" if context == "blank_image" else context,
                                blank_images=context == "blank_image")
        batch = collate([record])
        n_new = decoding.pop("max_new_tokens")
        text = self.generate_batch(batch, max_new_tokens=n_new, num_beams=decoding.pop("num_beams"), **decoding)[0]
        # the prompt the model was given (views in the collator's order: frontal first)
        rendered = collate.render(record, ordered_images(record, collate.max_views))
        return {"prompt": rendered.prompt, "qformer_prompt": rendered.qformer_prompt, "report": text,
                "max_new_tokens": n_new, "template": tpl.name, "num_views": len(images), "context": context,
                "views": [im.get("view") for im in ordered_images(record, collate.max_views)],
                "dtype": _dtype_name(self.model.dtype), "prompt_shortened": bool(collate.shortened),
                "prior": collate.prior if record.get("prior") else None}


@dataclass
class ModelFront:
    """A loaded model's processor, template and limits without its weights (see ReportModel.front)."""

    processor: object
    template: Template
    model_dir: str
    max_new_tokens: int
    max_views: int
    max_prompt_tokens: int
    decoder_only: bool
    runtime: dict  # dtype, device and quantization the weights were loaded with
    prior: str = "none"
    max_prior_views: int = 1

    def collator(self, template: Template | None = None, indication: str = "real",
                 blank_images: bool = False, prior: str | None = None) -> StudyCollator:
        return _generation_collator(self, template, indication, blank_images, prior)


def _generation_collator(m, template, indication: str, blank_images: bool, prior: str | None = None) -> StudyCollator:
    return StudyCollator(
        processor=m.processor, template=template or m.template, num_query_tokens=m.processor.num_query_tokens,
        decoder_only=m.decoder_only, mode="generate", max_views=m.max_views, indication=indication,
        generic_indication=GENERIC_INDICATION, blank_images=blank_images, max_prompt_tokens=m.max_prompt_tokens,
        prior=prior_mode_for(getattr(m, "prior", "none"), prior), max_prior_views=getattr(m, "max_prior_views", 1),
    )


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def default_dtype(device: str | torch.device) -> str:
    """bf16 on a GPU that supports it, else fp32: the one default of both generation modes."""
    is_cuda = torch.device(device).type == "cuda"
    return "bf16" if is_cuda and torch.cuda.is_bf16_supported() else "fp32"


def _compile_default(compile: bool | None, device) -> bool:
    from clinicalblip.decode import default_compile

    return default_compile(device) if compile is None else bool(compile)


def generate_single(model_dir: str, images: list[str], indication: str | None = None, history: str | None = None,
                    comparison: str | None = None, template: str | None = None, max_new_tokens: int | None = None,
                    num_beams: int = 1, context: str = "real", dtype: str | None = None, out: str | None = None,
                    views: list[str] | None = None, quantization: str = "none", compile: bool | None = None,
                    age=None, sex: str | None = None, hints=None, prior: dict | None = None,
                    **generate_kwargs) -> dict:
    """One study, with the same dtype default as generate_split (so both modes write the same text).

    Views, context and decoding are checked (as the server checks them) before the model loads.
    out: also write the result as JSON to this file.
    """
    from clinicalblip.data.images import load_image
    from clinicalblip.study import check_context, check_decoding, check_views

    if context == "shuffled":
        raise UserError("--context shuffled gives each study another study's indication: it needs a manifest "
                        "split (--manifest), not one study (--image)")
    check_views(len(images), views, model_max_views(model_dir))
    check_decoding(num_beams, max_new_tokens, **generate_kwargs)
    check_context({"indication": indication, "history": history, "comparison": comparison, "age": age, "sex": sex,
                   "hints": hints})
    for p in list(images) + list((prior or {}).get("images") or []):  # fail on a bad image before the model loads
        load_image(p)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = ReportModel.load(model_dir, dtype=dtype or default_dtype(device), device=device, quantization=quantization)
    rm.compile = _compile_default(compile, device)
    result = rm.report(images, indication=indication, history=history, comparison=comparison, template=template,
                       views=views, max_new_tokens=max_new_tokens, num_beams=num_beams, context=context,
                       age=age, sex=sex, hints=hints, prior=prior, **generate_kwargs)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result


def model_max_views(model_dir: str) -> int | None:
    """The views per study a stage or release folder was trained with, read without loading it (None: unknown)."""
    path = Path(model_dir)
    try:
        if is_stage_dir(path) and (path / "config.yaml").is_file():
            cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
            return int((cfg.get("data") or {}).get("max_views", 2))
        if is_release_dir(path):
            return int(read_release(path).get("max_views", 2))
    except (yaml.YAMLError, ValueError, TypeError, AttributeError):
        return None  # ReportModel.load names the broken file
    return None


def _dir_hash(model_dir: str) -> str:
    """A hash of the model generation runs: every stage of a chain (a retrained parent changes it too)."""
    from clinicalblip.model import fingerprint
    from clinicalblip.stages import stage_chain

    dirs = [Path(st["dir"]) for st in stage_chain(model_dir)] if is_stage_dir(model_dir) else [Path(model_dir)]
    h = hashlib.sha256()
    for d in dirs:
        for name in ("stage.json", "config.json", "clinicalblip.json", "adapter/adapter_config.json"):
            p = d / name
            if p.is_file():
                h.update(p.read_bytes())
        # weight files by size and content edges (model.fingerprint): same-shaped retrained weights differ
        h.update(fingerprint(d).encode())
        if (d / "adapter").is_dir():
            h.update(fingerprint(d / "adapter").encode())
    return h.hexdigest()[:16]


CONTEXT_MODES = ("real", "none", "generic", "shuffled", "blank_image")


def _shuffle_indications(records: list[dict]) -> list[dict]:
    """Give every study another study's indication (seeded permutation rotated by one: nobody keeps its own)."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(records), generator=g).tolist()
    donors = order[1:] + order[:1]
    out = [dict(r) for r in records]
    for i, j in zip(order, donors):
        out[i]["indication"] = records[j].get("indication")
    return out


def _done_ids(out: Path) -> set[str]:
    done = set()
    if out.is_file():
        with open(out, encoding="utf-8") as fh:
            for line in fh:
                try:
                    done.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by a crash: regenerated
    return done


def _drop_partial_tail(path: Path) -> None:
    """A crash mid-write leaves a line without its newline: cut it, so the next row starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = path.read_bytes()
        fh.truncate(data.rfind(b"\n") + 1)


def _merge_parts(out_path: Path) -> None:
    """Fold per-rank part files into the output (ids already there are not written twice)."""
    parts = sorted(out_path.parent.glob(out_path.name + ".part*"))
    if not parts:
        return
    _drop_partial_tail(out_path)
    done = _done_ids(out_path)
    with open(out_path, "a", encoding="utf-8") as fh:
        for part in parts:
            with open(part, encoding="utf-8") as ph:
                for line in ph:
                    try:
                        rid = str(json.loads(line)["id"])
                    except (json.JSONDecodeError, KeyError):
                        continue  # a line cut by a crash: that id is generated again
                    if rid not in done:
                        fh.write(line if line.endswith("\n") else line + "\n")
                        done.add(rid)
            part.unlink()


# The settings a resumed predictions file must share with the run that started it; the rest of the meta file
# (paths, process count, code version, counts) may change between runs.
PROVENANCE_KEYS = ("model_hash", "template", "template_hash", "context", "decoding", "dtype", "quantization",
                   "manifest_hash", "split", "max_prompt_tokens", "prior")


def _template_hash(tpl: Template) -> str:
    return hashlib.sha256(json.dumps(tpl.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def check_resume(out_path: Path, settings: dict, key: str) -> None:
    """Refuse to append to a predictions file written with other settings (or of unknown origin).

    Raises UserError naming the file, the differing keys (old -> new) and the way out (--overwrite or
    another --out).
    """
    out_path = Path(out_path)
    meta_path = Path(str(out_path) + ".meta.json")
    has_rows = out_path.is_file() and out_path.stat().st_size > 0
    if not has_rows:
        return
    fix = "pass --overwrite to start the file over, or write to another --out"
    if not meta_path.is_file():
        raise UserError(f"{out_path} already holds predictions but {meta_path.name} is missing, so their "
                        f"settings are unknown: {fix}")
    try:
        old = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{meta_path}: unreadable provenance file: {fix}") from None
    diff = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in PROVENANCE_KEYS if old.get(k) != settings[k]]
    if diff:
        raise UserError(f"{out_path} was generated with other settings ({'; '.join(diff)}); resuming would mix "
                        f"them in one file: {fix}")
    with open(out_path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: dropped and regenerated
            if row.get("provenance") != key:
                raise UserError(f"{out_path} line {n} (id {row.get('id')}): written by another run (provenance "
                                f"{row.get('provenance')!r}, this run {key!r}): {fix}")


def generate_split(model_dir: str, manifest: str, split: str, out: str, template: str | None = None,
                   context: str = "real", max_new_tokens: int | None = None, num_beams: int = 1,
                   batch_size: int = 16, limit: int | None = None, dtype: str | None = None,
                   overwrite: bool = False, quantization: str = "none", image_cache: str | None = None,
                   num_workers: int = -1, on_bad_record: str = "error", compile: bool | None = None,
                   prior: str | None = None, **generate_kwargs) -> int:
    """Generate a report for every study of a split; output written as it goes, a rerun skips finished ids.

    context: real | none (indication left out) | generic (replaced by an uninformative one) | shuffled (another
    study's indication) | blank_image (real context, every image replaced by a blank one).
    Under `accelerate launch --num_processes N` every rank takes every N-th pending study and writes its own
    part file; rank 0 folds the parts into `out` at the end (and at the start of a rerun after a crash).
    A rerun resumes only with the same settings (model, template, context, decoding, dtype, manifest, split:
    see PROVENANCE_KEYS); other settings are refused, naming the difference, unless overwrite=True, which
    starts the file over. Every row carries the short hash of those settings as "provenance".
    generate_kwargs go to `model.generate` (do_sample, temperature, top_p, repetition_penalty,
    no_repeat_ngram_size, length_penalty, ...). image_cache: a `data cache` folder to read pixels from (also
    used when `manifest` is a cache's manifest.jsonl); num_workers: loader workers (-1: what the machine affords).
    on_bad_record: the split's records get train's record check before the model loads (missing or unreadable
    images, duplicate ids, no target section): "error" refuses naming them, "skip" leaves them out, listing
    their ids.
    prior: what of each study's linked prior the prompt shows: None = what the model takes (data.prior), or
    none | report | images | both (the prior ablations; refused when the model does not take it).
    """
    from accelerate import PartialState

    if context not in CONTEXT_MODES:
        raise UserError(f"unknown context mode '{context}' (known: {', '.join(CONTEXT_MODES)})")
    records = read_manifest(manifest, split=split)
    if not records:
        raise UserError(f"{manifest}: no records in split '{split}'")
    if context == "shuffled":  # before --limit: a rerun with another limit keeps every study's donor
        records = _shuffle_indications(records)
    if limit:
        records = records[:limit]
    # cpu=True when there is no GPU: under torchrun the ranks then form a gloo group (MULTI_CPU).
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    records = checked_split_records(records, model_dir, template, split, on_bad_record, image_cache, manifest,
                                    log=print if main else (lambda msg: None))
    dtype = dtype or default_dtype(state.device)
    rm = ReportModel.load(model_dir, dtype=dtype, device=str(state.device), quantization=quantization)
    rm.compile = _compile_default(compile, state.device)
    tpl = load_template(template) if template else rm.template
    out_path = Path(out)
    meta_path = Path(str(out_path) + ".meta.json")
    decoding = {"num_beams": num_beams, "max_new_tokens": max_new_tokens or rm.max_new_tokens,
                "do_sample": bool(generate_kwargs.get("do_sample", False)), **generate_kwargs}
    settings = {"model_hash": _dir_hash(model_dir), "template": tpl.name, "template_hash": _template_hash(tpl),
                "context": context, "decoding": decoding, "dtype": dtype, "quantization": quantization,
                "manifest_hash": file_hash(manifest),
                "split": split, "max_prompt_tokens": rm.max_prompt_tokens,
                # None for a model without priors, so predictions files written before priors existed still resume
                "prior": None if rm.prior == "none" and prior in (None, "none") else
                prior_mode_for(rm.prior, prior)}
    prov_key = _settings_key(settings)
    if main:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in [out_path, meta_path, *out_path.parent.glob(out_path.name + ".part*")]:
                stale.unlink(missing_ok=True)
        _merge_parts(out_path)  # leftovers of an interrupted multi-process run
    state.wait_for_everyone()
    check_resume(out_path, settings, prov_key)  # every rank: they all refuse together
    state.wait_for_everyone()
    done = _done_ids(out_path)
    todo = sorted((r for r in records if str(r["id"]) not in done), key=lambda r: str(r["id"]))
    todo = todo[state.process_index:: state.num_processes]
    collate = rm.collator(tpl, indication="real" if context in ("shuffled", "blank_image") else context,
                          blank_images=context == "blank_image", prior=prior)
    if main:
        note_unused_priors(records, rm.prior)
    collate.image_cache = pixel_source(rm.processor.image_processor, find_image_cache(image_cache, manifest))
    if main:
        provenance = {
            **settings, "provenance": prov_key, "model_dir": os.path.abspath(model_dir),
            "manifest": os.path.abspath(manifest), "num_processes": state.num_processes,
            "code_version": __version__,
            # studies whose context (history, then comparison, then indication) was cut to fit the prompt
            "prompts_shortened": collate.count_shortened(records), "studies": len(records),
            # the training limit: reports longer than this were cut in training (and generation stops there)
            "max_report_tokens": rm.max_new_tokens,
        }
        meta_path.write_text(json.dumps(provenance, indent=2))
    # Similar lengths together: less padding per batch (views decide the image tokens, then the prompt).
    todo.sort(key=lambda r: (len(r["images"]), len(r.get("indication") or "") + len(r.get("history") or "")))
    part = out_path if state.num_processes == 1 else Path(f"{out_path}.part{state.process_index}")
    _drop_partial_tail(part)
    with no_empty_file_on_error(part, meta_path if part == out_path else None), \
            open(part, "a", encoding="utf-8") as fh:
        batches = make_loader(todo, batch_size, collate, num_workers=num_workers, return_records=True)
        for chunk, batch in progress(batches, desc=f"generate {split}", unit="batch", disable=not main):
            texts = rm.generate_batch(batch, max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)
            for rec, text, prompt in zip(chunk, texts, batch["prompts"]):
                row = {"id": rec["id"], "prediction": text, "reference": target_text(tpl, rec), "prompt": prompt,
                       "provenance": prov_key}
                for key in ("dataset", "labels", "split"):
                    if key in rec:
                        row[key] = rec[key]
                row.update(prior_row_fields(rec, collate))
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
    state.wait_for_everyone()
    if main and state.num_processes > 1:
        _merge_parts(out_path)
    return len(records)


@contextlib.contextmanager
def no_empty_file_on_error(path: Path, meta: Path | None = None):
    """A run that fails before its first row leaves no 0-byte predictions file (nor its meta) behind."""
    try:
        yield
    except BaseException:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()
            if meta is not None:
                meta.unlink(missing_ok=True)
        raise


def checked_split_records(records: list[dict], model_dir: str, template: str | None, split: str, policy: str,
                          image_cache: str | None, manifest: str, log) -> list[dict]:
    """train's record check on a split, before the model loads (see generate_split's on_bad_record)."""
    from clinicalblip.data.check import apply_bad_record_policy

    if policy not in ("error", "skip"):
        raise UserError(f"--on-bad-record must be error or skip, not {policy!r}")
    try:  # the target section the reports are scored against: the template's
        tpl = load_template(template) if template else load_template_of(model_dir) if is_stage_dir(model_dir) \
            else release_template(Path(model_dir), read_release(model_dir)) if is_release_dir(model_dir) else None
    except Exception:  # noqa: BLE001 - an unreadable model folder is refused with its own message when it loads
        tpl = None
    # a study without a reference report is still a study to report on (new, unreported studies): it is
    # generated, counted here, and skipped with a count by eval; only unusable inputs are refused or skipped
    kept = apply_bad_record_policy(
        records, policy, log=log, image_cache=find_image_cache(image_cache, manifest), what=f"records of split '{split}'")
    if not kept:
        raise UserError(f"{manifest}: no usable records in split '{split}' (all {len(records)} skipped)")
    if tpl is not None:
        no_ref = [r["id"] for r in kept if not str(r.get(tpl.target) or "").strip()]
        if no_ref:
            shown = ", ".join(map(str, no_ref[:20])) + (f" and {len(no_ref) - 20} more" if len(no_ref) > 20 else "")
            log(f"{len(no_ref)} of {len(kept)} records of split '{split}' have no reference {tpl.target}: generated; "
                f"eval skips them with a count ({shown})")
    return kept
