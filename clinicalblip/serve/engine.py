"""The model side of the server: settings, model facts for /v1/model, request validation and preprocessing.

Nothing here knows about HTTP beyond `FormError` (status, field, message); app.py turns it into JSON.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clinicalblip import __version__
from clinicalblip.data.images import ImageLoadError, dicom_view_position, load_image_bytes
from clinicalblip.generate import ModelFront, ReportModel, _dir_hash
from clinicalblip.metrics.labeler import OBSERVATIONS, label_report
from clinicalblip.prompts import KNOWN_SLOTS, Template, TemplateError, available_templates, load_template
from clinicalblip.serve.batching import merge_batches
from clinicalblip.serve.forms import Form, FormError
from clinicalblip.serve.prior import PRIOR_FIELDS, attach_form_prior
from clinicalblip.serve.worker import ModelWorker
from clinicalblip.study import CONTEXT_FIELDS, StudyInputError, check_decoding, check_views, study_record

MB = 2**20
TEXT_FIELDS = CONTEXT_FIELDS  # every template slot but views: indication, history, comparison, age, sex, hints
DECODING_FIELDS = ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty")
FORM_FIELDS = ("images", "views", "template") + TEXT_FIELDS + DECODING_FIELDS + PRIOR_FIELDS
DEFAULT_CARD = (
    "Research on radiology report generation. Not a medical device and not for clinical use: generated reports "
    "can be wrong, omit findings or invent them, and must not be used for diagnosis without review by a "
    "radiologist. Performance outside the training data's population, views and report style is unknown. "
    "(This is a stage folder: no release model card was found; `clinicalblip merge` writes one.)"
)


@dataclass
class ServeSettings:
    """Limits and batching knobs. Every limit is reported by GET /v1/model."""

    max_batch: int = 8
    max_wait_ms: float = 15.0
    max_queue: int = 64
    max_file_mb: float = 50.0  # per uploaded file
    max_views: int | None = None  # per study; None: the number the model was trained with
    max_text_bytes: int = 16 * 1024  # per text field (an indication is a sentence or two)
    max_pixels: int = 40_000_000  # per image, checked on the header before decoding (decompression bombs)
    max_new_tokens_limit: int = 512
    max_beams: int = 8
    retry_after_s: int = 1
    generation_timeout_s: float | None = 300.0  # a batch running longer fails with 504 and the worker restarts
    api_key: str | None = None  # when set, every request needs "Authorization: Bearer <key>"

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)


def _intended_use(model_dir: Path) -> tuple[str, str]:
    """The 'Intended use and limitations' section of a release's model card, or the default text."""
    card = model_dir / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        lines, keep = [], False
        for line in text.splitlines():
            if line.startswith("## "):
                if keep:
                    break
                keep = line[3:].strip().lower().startswith("intended use")
                continue
            if keep:
                lines.append(line)
        body = "\n".join(lines).strip()
        if body:
            return body, "README.md"
    return DEFAULT_CARD, "default"


def model_facts(rm: ReportModel | ModelFront) -> dict:
    """Base, stages, template, code version and model hash of a loaded model folder."""
    path = Path(rm.model_dir)
    facts: dict = {"model_dir": str(path.resolve()), "model_hash": _dir_hash(str(path)), "code_version": __version__}
    if (path / "stage.json").is_file():
        from clinicalblip.stages import stage_chain

        chain = stage_chain(path)
        facts.update(kind="stage", base=chain[0].get("base"), stages=[s["name"] for s in chain])
    else:
        from clinicalblip.release import read_release

        meta = read_release(path)
        facts.update(kind="release", base=meta.get("base"), stages=[s.get("name") for s in meta.get("stages", [])],
                     trained_with=meta.get("code_version"))
    text, source = _intended_use(path)
    facts["card"] = {"intended_use": text, "source": source}
    return facts


def _parse_number(form: Form, name: str, kind):
    """A number field as int/float (None when absent); ranges are checked in study.check_decoding."""
    raw = form.one(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        raise FormError(422, name, f"'{raw[:40]}' is not {'an integer' if kind is int else 'a number'}") from None


def _parse_bool(form: Form, name: str) -> bool:
    raw = form.one(name)
    if raw is None or raw.strip() == "":
        return False
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise FormError(422, name, f"'{raw[:20]}' is not a boolean (true/false)")


class ReportService:
    """A loaded model plus everything the endpoints need: validation, preprocessing, batched generation.

    `model` is a started ModelWorker (generation in its own process: what `serve` runs) or a ReportModel
    (generation in this process: `serve --in-process`, and most API tests).
    """

    def __init__(self, model: ReportModel | ModelWorker, settings: ServeSettings | None = None):
        if isinstance(model, ModelWorker):
            self.worker, self.rm, front = model, None, model.front
        else:
            self.worker, self.rm, front = None, model, model.front()
        self.front = front
        self.settings = settings or ServeSettings()
        self.max_views = self.settings.max_views or front.max_views
        self.facts = model_facts(front)
        self.facts["runtime"] = dict(front.runtime)
        self.templates = sorted(set(available_templates()) | {front.template.name})
        self._template_cache: dict[str, Template] = {front.template.name: front.template}
        tok, qtok = front.processor.tokenizer, front.processor.qformer_tokenizer
        self.pad_id, self.qpad_id = tok.pad_token_id, qtok.pad_token_id
        self.decoder_only = front.decoder_only
        # Fast tokenizers change their padding/truncation state inside a call, which is not thread-safe
        # ("Already borrowed"): request threads take turns at tokenising; image decoding stays parallel.
        self._collate_lock = threading.Lock()

    def with_settings(self, settings: ServeSettings) -> "ReportService":
        """Another service on the same loaded model (or worker) with other limits."""
        other = ReportService(self.worker or self.rm, settings)
        other._collate_lock = self._collate_lock  # the same tokenizers
        return other

    @property
    def model_loaded(self) -> bool:
        return self.worker.alive if self.worker is not None else self.rm is not None

    @property
    def warming(self) -> bool:
        """The worker is compiling / warming up: requests queue until it is done."""
        return self.worker is not None and self.worker.warming

    def generation_info(self) -> dict:
        if self.worker is None:
            return {"mode": "in-process", "pid": os.getpid(), "compile": bool(getattr(self.rm, "compile", False)),
                    "warmup": getattr(self, "warmup", None)}
        return {"mode": "worker-process", "pid": self.worker.pid, "alive": self.worker.alive,
                "restarts": self.worker.restarts, "last_restart": self.worker.last_restart,
                "compile": self.worker.compile, "decode": self.worker.decode, "warming": self.worker.warming,
                "warmup": self.worker.warmup,
                "timeout_s": self.worker.timeout_s}

    def close(self) -> None:
        """Stop the model worker, if this service has one (services made by with_settings share it)."""
        if self.worker is not None:
            self.worker.close()

    # ------------------------------------------------------------------ facts
    def model_info(self) -> dict:
        s = self.settings
        tpl = self.front.template
        return {
            **self.facts,
            "generation": self.generation_info(),
            "template": {"name": tpl.name, "slots": tpl.slots, "target": tpl.target, "description": tpl.description},
            "templates": self.templates,
            "decoding_defaults": {"num_beams": 1, "max_new_tokens": self.front.max_new_tokens, "do_sample": False,
                                  "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0},
            "prior": {"takes": getattr(self.front, "prior", "none"),
                      "max_prior_views": getattr(self.front, "max_prior_views", 1)},
            "limits": {"max_views": self.max_views, "max_file_bytes": s.max_file_bytes,
                       "max_text_bytes": s.max_text_bytes, "max_pixels": s.max_pixels,
                       "max_new_tokens": s.max_new_tokens_limit, "max_beams": s.max_beams,
                       "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue},
            "labeler": "chexpert-rules", "observations": list(OBSERVATIONS),
        }

    # ------------------------------------------------------------------ validation
    def template(self, name: str | None) -> Template:
        if not name or not name.strip():
            return self.front.template
        name = name.strip()
        if name not in self._template_cache:
            if name not in self.templates:
                raise FormError(422, "template", f"unknown template '{name[:60]}' (available: "
                                                 f"{', '.join(self.templates)})")
            try:
                self._template_cache[name] = load_template(name)
            except TemplateError as exc:
                raise FormError(422, "template", str(exc)) from None
        return self._template_cache[name]

    def decoding(self, form: Form) -> dict:
        """Validated generate() settings (the CLI's checks, study.check_decoding); absurd values are refused."""
        s = self.settings
        kinds = {"num_beams": int, "max_new_tokens": int, "temperature": float, "top_p": float,
                 "repetition_penalty": float}
        values = {name: _parse_number(form, name, kind) for name, kind in kinds.items()}
        try:
            return check_decoding(do_sample=_parse_bool(form, "do_sample"), max_beams=s.max_beams,
                                  max_new_tokens_limit=s.max_new_tokens_limit,
                                  default_max_new_tokens=self.front.max_new_tokens, **values)
        except StudyInputError as exc:
            raise FormError(422, exc.field, exc.message) from None

    def check_fields(self, form: Form) -> None:
        for name in list(form.fields) + [f.field for f in form.files]:
            if name not in FORM_FIELDS:
                hint = (f"'{name}' is a template slot the API does not take" if name in KNOWN_SLOTS
                        else f"unknown field '{name[:40]}'")
                raise FormError(422, name[:40], f"{hint} (known fields: {', '.join(FORM_FIELDS)})")
        for f in form.files:
            if f.field not in ("images", "prior_images"):
                raise FormError(422, f.field, "files go in the 'images' field (the prior study's in 'prior_images')")
        if "images" in form.fields:
            raise FormError(422, "images", "'images' must be uploaded files, not text")

    # ------------------------------------------------------------------ preprocessing
    def decode_image(self, data: bytes, filename: str, field: str):
        """Upload bytes -> RGB PIL image; the file name only decides DICOM-by-suffix and is never echoed."""
        suffix = Path(filename or "").suffix.lower()[:8]
        try:
            return load_image_bytes(data, name=f"{field}{suffix}", max_pixels=self.settings.max_pixels)
        except ImageLoadError as exc:
            # the field is named once, by the error's field: the message does not repeat it
            name = f"{field}{suffix}"
            msg = str(exc).replace(f" {name}:", ":", 1).replace(f": {name}", "", 1)
            msg = msg.removeprefix(f"{name}: ")
            raise FormError(422, field, msg.replace(name, field)) from None

    def prepare(self, form: Form) -> dict:
        """Validate a study form and build its single-study batch (CPU work: run it in a worker thread)."""
        t0 = time.perf_counter()
        self.check_fields(form)
        images = [f for f in form.files if f.field == "images"]
        try:
            views = check_views(len(images), form.fields.get("views"), self.max_views)
        except StudyInputError as exc:
            raise FormError(422, exc.field, exc.message) from None
        texts = {name: form.one(name) for name in TEXT_FIELDS}
        tpl = self.template(form.one("template"))
        decoding = self.decoding(form)
        pil = [self.decode_image(f.data, f.filename, f"images[{i}]") for i, f in enumerate(images)]
        views = [v or dicom_view_position(f.data) for v, f in zip(views, images)]  # as `generate --image` does
        try:
            record = study_record(pil, views, texts, key="image")
        except StudyInputError as exc:
            raise FormError(422, exc.field, exc.message) from None
        prior = attach_form_prior(self, record, form)
        collate = self.front.collator(tpl)
        collate.max_views = self.max_views
        with self._collate_lock:
            batch = collate([record])
        ignored = [n for n in TEXT_FIELDS if texts[n] and n not in tpl.slots]
        if prior in ("report", "both") and "prior" not in tpl.slots:
            ignored.append("prior")  # the template cannot show the prior report (its images are still used)
        from clinicalblip.data.collate import ordered_images

        used = [im.get("view") for im in ordered_images(record, self.max_views)]
        return {"batch": batch, "decoding": decoding, "template": tpl.name, "prompt": batch["prompts"][0],
                "views": used, "ignored": ignored, "preprocessing_ms": (time.perf_counter() - t0) * 1000,
                "prior": prior,
                "image_bytes": [len(f.data) for f in images]}

    # ------------------------------------------------------------------ generation (batcher thread)
    def run_batch(self, jobs) -> list[str]:
        batch = merge_batches([j.batch for j in jobs], self.pad_id, self.qpad_id, left_pad=self.decoder_only)
        if self.worker is not None:
            return self.worker.generate(batch, jobs[0].decoding)
        d = dict(jobs[0].decoding)
        return self.rm.generate_batch(batch, max_new_tokens=d.pop("max_new_tokens"), num_beams=d.pop("num_beams"),
                                      **d)

    @staticmethod
    def findings(report: str) -> dict:
        labels = label_report(report)
        return {"labeler": "chexpert-rules", "labels": labels,
                "positive": [o for o, v in labels.items() if v == 1],
                "uncertain": [o for o, v in labels.items() if v == -1],
                "negative": [o for o, v in labels.items() if v == 0]}

    def settings_dict(self) -> dict:
        d = asdict(self.settings)
        d.pop("api_key", None)
        return d
