"""Records -> tensors: images, rendered prompt, report tokens and the loss mask.

Multi-view studies: every view is its own row of `pixel_values` (and of the Q-Former instruction), and the
LLM input of a study holds `num_views * num_query_tokens` image tokens. InstructBLIP scatters the query
outputs into the image-token positions in order, so views land in view order, studies may have different
numbers of views (a missing lateral just means fewer image tokens), and plain `transformers` runs the same
inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from clinicalblip.data.images import load_image
from clinicalblip.errors import UserError
from clinicalblip.prompts import Template, render, target_text

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
# Context slots shortened, in this order, when a prompt is longer than max_prompt_tokens: the instruction and
# the image tokens are never cut (a prompt cut from the right loses "Write the findings..." first).
# The prior report (data.prior) is shortened first: the current study's own context matters more.
SHORTEN_ORDER = ("prior", "history", "comparison", "indication")
FRONTAL_VIEWS = {"PA", "AP", "FRONTAL", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD"}
LATERAL_VIEWS = {"LATERAL", "LL", "RL", "LAO", "RAO", "LPO", "RPO", "XTABLE LATERAL", "SWIMMERS"}


def _view_rank(view: str | None) -> int:
    v = (view or "").upper()
    return 0 if v in FRONTAL_VIEWS else 1 if v in LATERAL_VIEWS else 2


def ordered_images(record: dict, max_views: int) -> list[dict]:
    """Frontal views first, then lateral, then others (stable within each), at most max_views."""
    images = sorted(record.get("images") or [], key=lambda im: _view_rank(im.get("view")))
    return images[:max_views]


def _clean(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = " ".join(value.split())
        return value or None
    return value


def clinical_context(record: dict, images: list[dict], indication: str = "real", generic_indication: str = "") -> dict:
    """Slot values for a record. indication: 'real' | 'none' (left out) | 'generic' (replaced)."""
    ind = _clean(record.get("indication"))
    if indication == "none":
        ind = None
    elif indication == "generic":
        ind = generic_indication
    ctx = {
        "indication": ind,
        "history": _clean(record.get("history")),
        "comparison": _clean(record.get("comparison")),
        "views": [im["view"] for im in images if im.get("view")],
    }
    for key in ("age", "sex", "hints"):
        if record.get(key) not in (None, "", []):
            ctx[key] = record[key]
    if isinstance(ctx.get("hints"), str):  # "effusion,pneumothorax" renders as a list does: "effusion, pneumothorax"
        ctx["hints"] = ctx["hints"].split(",")
    return ctx


def _keep(seed: int, epoch: int, rid: str, p: float) -> bool:
    """Deterministic per (seed, epoch, id) coin: the same draw after a resume or on another rank."""
    if p <= 0:
        return True
    h = hashlib.blake2b(f"{seed}:{epoch}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 >= p


@dataclass
class StudyCollator:
    """Turns a list of manifest records into a model batch.

    mode="train": input + report tokens, labels only on the report (and EOS, unless the report was cut at
    max_report_tokens).
    mode="generate": prompt only, left-padded for decoder-only models.
    """

    processor: object
    template: Template
    num_query_tokens: int
    decoder_only: bool = True
    mode: str = "train"
    max_views: int = 2
    max_report_tokens: int = 128
    max_prompt_tokens: int = 256
    indication: str = "real"  # real | none | generic
    generic_indication: str = "Routine chest radiograph."
    context_dropout: float = 0.0  # train only: probability of leaving the indication out
    seed: int = 0
    epoch: int = 0
    image_cache: dict | None = field(default=None, repr=False)
    blank_images: bool = False  # ablation: every view replaced by a uniform gray image
    # ids of the studies whose context was shortened to fit max_prompt_tokens (reported by train and generate)
    shortened: set = field(default_factory=set, repr=False)
    # The prior study (clinicalblip/data/priors.py): what the model takes (data.prior) and, train only, the
    # probability of withholding one of its parts (data.prior_dropout).
    prior: str = "none"  # none | report | images | both
    prior_dropout: float = 0.0
    max_prior_views: int = 1

    def __post_init__(self):
        from clinicalblip.data.priors import check_prior_template, prior_mode_for_template

        if self.mode == "train":  # training refuses a prior report the template cannot show
            check_prior_template(self.prior, self.template)
        else:  # generation with another template (--template): the prior report is left out, its images stay
            self.prior = prior_mode_for_template(self.prior, self.template)

    def prior_inputs(self, record: dict) -> tuple[str | None, list[dict]]:
        """(prior report text or None, prior images) that this study's prompt shows (data.prior)."""
        from clinicalblip.data.priors import prior_inputs

        return prior_inputs(record, self.prior, self.max_prior_views,
                            self.prior_dropout if self.mode == "train" else 0.0, self.seed, self.epoch)

    def image_token_id(self) -> int:
        """The tokenizer's id for `<image>`; refused when the tokenizer does not know the token."""
        tok = self.processor.tokenizer
        tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
            raise UserError(f"the tokenizer has no '{IMAGE_TOKEN}' token (it maps to the unknown id {tid}): the "
                            "model would never see the images. Use the processor saved with the model (its "
                            "processor/ folder or a current InstructBLIP snapshot)")
        return tid

    def check_image_tokens(self, model_config) -> int:
        """Refuse a tokenizer / processor / model that disagree on the image token or the query count.

        HF scatters the query outputs wherever input_ids == config.image_token_id, so a mismatch trains or
        generates without images and no error is raised downstream. Returns the checked id.
        """
        tid = self.image_token_id()
        model_tid = getattr(model_config, "image_token_id", None)
        if model_tid is None:
            model_tid = getattr(model_config, "image_token_index", None)
        if model_tid is not None and int(model_tid) != tid:
            raise UserError(f"image token mismatch: the tokenizer's '{IMAGE_TOKEN}' is id {tid} but the model's "
                            f"config.image_token_id is {model_tid}. Load the processor and the model from the "
                            "same checkpoint (or set image_token_id in config.json to the tokenizer's id)")
        proc_tid = getattr(self.processor, "image_token_id", None)
        if proc_tid is None and getattr(self.processor, "image_token", None) is not None:
            proc_tid = self.processor.tokenizer.convert_tokens_to_ids(str(self.processor.image_token))
        if proc_tid is not None and int(proc_tid) != tid:
            raise UserError(f"image token mismatch: the processor's image token is id {proc_tid}, the tokenizer's "
                            f"'{IMAGE_TOKEN}' is id {tid}: use a processor saved with this model")
        nq = getattr(model_config, "num_query_tokens", None)
        if nq is not None and int(nq) != self.num_query_tokens:
            raise UserError(f"query token mismatch: the collator puts {self.num_query_tokens} image tokens per view "
                            f"but the model's config.num_query_tokens is {nq}: use the processor saved with this "
                            "model (processor.num_query_tokens)")
        return tid

    def _qformer_limit(self) -> int:
        # the Q-Former (BERT) has its own position limit (512 for InstructBLIP), whatever the LLM allows
        return min(self.max_prompt_tokens, int(self.processor.qformer_tokenizer.model_max_length))

    def _prompt_fits(self, rendered) -> bool:
        n = len(self.processor.tokenizer(rendered.prompt, add_special_tokens=True)["input_ids"])
        nq = len(self.processor.qformer_tokenizer(rendered.qformer_prompt, add_special_tokens=True)["input_ids"])
        return n <= self.max_prompt_tokens and nq <= self._qformer_limit()

    def fit_prompt(self, record: dict, images: list[dict], ctx: dict):
        """Render ctx; if too long, shorten the prior report, then history, comparison, indication (words cut from
        the end).

        Returns (rendered, shortened). A prompt that is too long with every context slot emptied is refused:
        the instruction itself does not fit data.max_prompt_tokens.
        """
        rendered = render(self.template, ctx)
        if self._prompt_fits(rendered):
            return rendered, False
        ctx = dict(ctx)
        for slot in SHORTEN_ORDER:
            words = (ctx.get(slot) or "").split()
            if not words:
                continue
            ctx[slot] = None
            if not self._prompt_fits(render(self.template, ctx)):
                continue  # even without this slot it is too long: empty it, shorten the next one
            lo, hi = 0, len(words) - 1  # the most words of this slot that still fit (0 fits)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                ctx[slot] = " ".join(words[:mid])
                if self._prompt_fits(render(self.template, ctx)):
                    lo = mid
                else:
                    hi = mid - 1
            ctx[slot] = " ".join(words[:lo]) or None
            return render(self.template, ctx), True
        raise UserError(f"record {record.get('id')}: the prompt of template '{self.template.name}' is longer than "
                        f"data.max_prompt_tokens={self.max_prompt_tokens} tokens even with the prior report, history, "
                        "comparison and indication left out: raise data.max_prompt_tokens or use a shorter template")

    def count_shortened(self, records: list[dict]) -> int:
        """How many of these studies get a shortened context (no images are read): for run headers."""
        if not records:
            return 0
        tok, qtok = self.processor.tokenizer, self.processor.qformer_tokenizer
        ctxs = [clinical_context(r, ordered_images(r, self.max_views), indication=self.indication,
                                 generic_indication=self.generic_indication) for r in records]
        if self.prior != "none":
            from clinicalblip.data.priors import add_prior_context

            for r, c in zip(records, ctxs):
                add_prior_context(c, *self.prior_inputs(r))
        rendered = [render(self.template, c) for c in ctxs]
        # One batched tokenisation pass finds the long ones; only those are fitted one by one (which also
        # refuses, before any training, a template whose instruction alone is too long).
        lens = [len(x) for x in tok([r.prompt for r in rendered], add_special_tokens=True)["input_ids"]]
        qlens = [len(x) for x in qtok([r.qformer_prompt for r in rendered], add_special_tokens=True)["input_ids"]]
        n = 0
        for rec, ctx, a, b in zip(records, ctxs, lens, qlens):
            if a > self.max_prompt_tokens or b > self._qformer_limit():
                self.fit_prompt(rec, ordered_images(rec, self.max_views), ctx)
                n += 1
        return n

    def report_lengths(self, records: list[dict]) -> list[int]:
        """Target tokens of each record's report (before the max_report_tokens cut, EOS not counted)."""
        texts = [target_text(self.template, r) for r in records]
        if not texts:
            return []
        return [len(x) for x in self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _pixels(self, paths: list[str]) -> torch.Tensor:
        if self.blank_images:
            size = self.processor.image_processor.size
            gray = Image.new("RGB", (size.get("width", 224), size.get("height", 224)), (128, 128, 128))
            return self.processor.image_processor([gray] * len(paths), return_tensors="pt")["pixel_values"]
        if self.image_cache is None:
            # In-memory images (the server's uploads) come as PIL images, files as paths.
            imgs = [p if isinstance(p, Image.Image) else load_image(p) for p in paths]
            return self.processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
        out = []
        for p in paths:
            t = self.image_cache.get(p)
            if t is None:
                t = self.processor.image_processor([load_image(p)], return_tensors="pt")["pixel_values"][0]
                self.image_cache[p] = t
            out.append(t)
        return torch.stack(out)

    def render(self, record: dict, images: list[dict]):
        """The prompt of a study as the model sees it (context shortened to max_prompt_tokens if needed)."""
        ind = self.indication
        if self.mode == "train" and ind == "real" and not _keep(self.seed, self.epoch, str(record["id"]), self.context_dropout):
            ind = "none"
        ctx = clinical_context(record, images, indication=ind, generic_indication=self.generic_indication)
        if self.prior != "none":
            from clinicalblip.data.priors import add_prior_context

            add_prior_context(ctx, *self.prior_inputs(record))
        rendered, shortened = self.fit_prompt(record, images, ctx)
        if shortened:
            self.shortened.add(str(record.get("id")))
        return rendered

    def __call__(self, records: list[dict]) -> dict:
        tok = self.processor.tokenizer
        qtok = self.processor.qformer_tokenizer
        image_id = self.image_token_id()
        eos = tok.eos_token_id
        pad = tok.pad_token_id
        paths, q_texts, seqs, labels, prompts = [], [], [], [], []
        for rec in records:
            images = ordered_images(rec, self.max_views)
            if not images:
                raise ValueError(f"record {rec.get('id')}: no images")
            rendered = self.render(rec, images)
            prompts.append(rendered.prompt)
            if self.prior != "none":  # the prior's images: extra blocks after the current views
                images = images + self.prior_inputs(rec)[1]
            paths += [im["image"] if "image" in im else im["path"] for im in images]
            q_texts += [rendered.qformer_prompt] * len(images)
            prompt_ids = tok(rendered.prompt, add_special_tokens=True)["input_ids"]  # fits: see render
            ids = [image_id] * (len(images) * self.num_query_tokens) + prompt_ids
            if image_id in prompt_ids:
                # the model would scatter image features into these positions too and fail or misplace views
                raise UserError(f"record {rec.get('id')}: its prompt text contains '{IMAGE_TOKEN}', which would "
                                f"make {len(images)} view(s) x {self.num_query_tokens} queries not match the image "
                                f"tokens: remove '{IMAGE_TOKEN}' from its indication/history/comparison")
            if self.mode == "train":
                report = target_text(self.template, rec)
                tgt = tok(report, add_special_tokens=False)["input_ids"]
                # A cut report gets no EOS: the model must not learn to stop mid-sentence at the limit.
                tgt = tgt[: self.max_report_tokens] if len(tgt) > self.max_report_tokens else tgt + [eos]
                if self.decoder_only:
                    seqs.append(ids + tgt)
                    labels.append([IGNORE_INDEX] * len(ids) + tgt)
                else:
                    seqs.append(ids)
                    labels.append(tgt)
            else:
                seqs.append(ids)
        q = qtok(q_texts, padding=True, truncation=True, max_length=self._qformer_limit(), return_tensors="pt")
        left = self.mode == "generate" and self.decoder_only
        batch = {
            "pixel_values": self._pixels(paths),
            "qformer_input_ids": q["input_ids"],
            "qformer_attention_mask": q["attention_mask"],
        }
        batch["input_ids"], batch["attention_mask"] = _pad(seqs, pad, left=left)
        if self.mode == "train":
            batch["labels"], _ = _pad(labels, IGNORE_INDEX, left=False)
        batch["ids"] = [str(r["id"]) for r in records]
        batch["prompts"] = prompts
        return batch


def _pad(seqs: list[list[int]], value: int, left: bool):
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        else:
            out[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return out, mask


MODEL_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")


def model_inputs(batch: dict) -> dict:
    """The tensors the model takes (drops ids/prompts)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
