"""Generation: one study (images + clinical context) or a whole manifest split, from a stage or release folder."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from clinicalblip import __version__
from clinicalblip.data.collate import StudyCollator, model_inputs
from clinicalblip.data.manifest import read_manifest
from clinicalblip.errors import UserError
from clinicalblip.model import is_decoder_only, load_pretrained
from clinicalblip.prompts import Template, load_template, template_from_dict
from clinicalblip.stages import is_release_dir, is_stage_dir, load_stage_model, load_template_of

RELEASE_META = "clinicalblip.json"
DEFAULT_MAX_NEW_TOKENS = 128


def generic_indication() -> str:
    try:
        from clinicalblip.data.synth import GENERIC_INDICATION

        return GENERIC_INDICATION
    except ImportError:  # pragma: no cover
        return "Routine chest radiograph."


@dataclass
class ReportModel:
    """A loaded model with everything needed to write reports: load once, call many times."""

    model: object
    processor: object
    template: Template
    model_dir: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_views: int = 2

    @classmethod
    def load(cls, model_dir: str, dtype: str = "fp32", device: str | None = None) -> "ReportModel":
        """Load a stage folder (the whole chain, merged) or a release folder."""
        path = Path(model_dir)
        if not path.exists():
            raise UserError(f"model folder not found: {model_dir}")
        if is_stage_dir(path):
            model, processor, _ = load_stage_model(path, dtype=dtype)
            template = load_template_of(path)
            cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
            max_new = int(cfg.get("data", {}).get("max_report_tokens", DEFAULT_MAX_NEW_TOKENS))
            max_views = int(cfg.get("data", {}).get("max_views", 2))
        elif is_release_dir(path):
            model, processor = load_pretrained(str(path), dtype=dtype)
            meta = json.loads((path / RELEASE_META).read_text()) if (path / RELEASE_META).is_file() else {}
            tname = meta.get("template")
            tfile = path / "prompts" / f"{tname}.yaml"
            template = template_from_dict(yaml.safe_load(tfile.read_text()), str(tfile)) if tname and tfile.is_file() \
                else load_template("findings_with_context")
            max_new = int(getattr(model.generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)
            max_views = int(meta.get("max_views", 2))
        else:
            raise UserError(f"{model_dir}: neither a stage folder (stage.json) nor a release folder (config.json)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        return cls(model=model, processor=processor, template=template, model_dir=str(path),
                   max_new_tokens=max_new, max_views=max_views)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def collator(self, template: Template | None = None, indication: str = "real") -> StudyCollator:
        return StudyCollator(
            processor=self.processor, template=template or self.template,
            num_query_tokens=self.processor.num_query_tokens, decoder_only=is_decoder_only(self.model),
            mode="generate", max_views=self.max_views, indication=indication,
            generic_indication=generic_indication(),
        )

    @torch.no_grad()
    def generate_batch(self, batch: dict, max_new_tokens: int | None = None, num_beams: int = 1, **kw) -> list[str]:
        inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
        if inputs["pixel_values"].dtype != self.model.dtype:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
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
               max_new_tokens: int | None = None, num_beams: int = 1, **generate_kwargs) -> dict:
        """One study: image paths (one per view) + clinical context -> {prompt, qformer_prompt, report, ...}."""
        if not images:
            raise UserError("give at least one image (one per view)")
        tpl = load_template(template) if template else self.template
        views = views or [None] * len(images)
        if len(views) != len(images):
            raise UserError(f"{len(images)} image(s) but {len(views)} view name(s)")
        record = {"id": "study", "images": [{"path": p, "view": v} for p, v in zip(images, views)],
                  "indication": indication, "history": history, "comparison": comparison}
        collate = self.collator(tpl)
        collate.max_views = max(self.max_views, len(images))
        batch = collate([record])
        n_new = max_new_tokens or self.max_new_tokens
        text = self.generate_batch(batch, max_new_tokens=n_new, num_beams=num_beams, **generate_kwargs)[0]
        rendered = collate.render(record, record["images"])
        return {"prompt": rendered.prompt, "qformer_prompt": rendered.qformer_prompt, "report": text,
                "max_new_tokens": n_new, "template": tpl.name, "num_views": len(images)}


def generate_single(model_dir: str, images: list[str], indication: str | None = None, history: str | None = None,
                    comparison: str | None = None, template: str | None = None, max_new_tokens: int | None = None,
                    num_beams: int = 1, **generate_kwargs) -> dict:
    from clinicalblip.data.images import load_image

    for p in images:  # fail on a bad image before the model loads
        load_image(p)
    rm = ReportModel.load(model_dir)
    return rm.report(images, indication=indication, history=history, comparison=comparison, template=template,
                     max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs)


def _dir_hash(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in ("stage.json", "config.json", "clinicalblip.json", "adapter/adapter_config.json"):
        p = Path(model_dir) / name
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("adapter/*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


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


def generate_split(model_dir: str, manifest: str, split: str, out: str, template: str | None = None,
                   context: str = "real", max_new_tokens: int | None = None, num_beams: int = 1,
                   batch_size: int = 16, limit: int | None = None) -> int:
    """Generate a report for every study of a split; output written as it goes, a rerun skips finished ids."""
    records = read_manifest(manifest, split=split)
    if not records:
        raise UserError(f"{manifest}: no records in split '{split}'")
    if limit:
        records = records[:limit]
    rm = ReportModel.load(model_dir)
    tpl = load_template(template) if template else rm.template
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(out_path)
    todo = [r for r in records if str(r["id"]) not in done]
    provenance = {
        "model_dir": os.path.abspath(model_dir), "model_hash": _dir_hash(model_dir), "template": tpl.name,
        "context": context, "decoding": {"num_beams": num_beams, "do_sample": False,
                                         "max_new_tokens": max_new_tokens or rm.max_new_tokens},
        "manifest": os.path.abspath(manifest), "split": split, "code_version": __version__,
    }
    Path(str(out_path) + ".meta.json").write_text(json.dumps(provenance, indent=2))
    # Similar lengths together: less padding per batch.
    todo.sort(key=lambda r: (len(r["images"]), len(r.get("indication") or "")))
    collate = rm.collator(tpl, indication=context)
    target = tpl.target
    with open(out_path, "a", encoding="utf-8") as fh:
        for i in tqdm(range(0, len(todo), batch_size), desc=f"generate {split}", unit="batch"):
            chunk = todo[i: i + batch_size]
            batch = collate(chunk)
            texts = rm.generate_batch(batch, max_new_tokens=max_new_tokens, num_beams=num_beams)
            for rec, text, prompt in zip(chunk, texts, batch["prompts"]):
                ref = rec.get("findings") if target == "findings" else rec.get("impression")
                row = {"id": rec["id"], "prediction": text, "reference": ref or "", "prompt": prompt}
                for key in ("dataset", "labels", "split"):
                    if key in rec:
                        row[key] = rec[key]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
    return len(records)
