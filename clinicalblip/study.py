"""One study's inference request, checked one way on every path: `generate --image` (the CLI),
`ReportModel.report` (the library) and `/v1/reports` (the API, and so the page).

A request gives images (one per view, with an optional view name each), clinical context for every slot a
template can declare, and decoding settings. The context goes into a manifest-like record that the training
collator renders, so the model is asked exactly as it was trained. Nothing here knows HTTP or argv: errors
are `StudyInputError(field, message)`, which the server turns into a 422 naming the form field and the CLI
into a one-line error naming the flag. Imports nothing of the model.
"""

from __future__ import annotations

import math

from clinicalblip.data.views import normalize_view
from clinicalblip.errors import UserError
from clinicalblip.prompts import KNOWN_SLOTS

# Every template slot except `views` (which come one per image): what a request may give as clinical context.
CONTEXT_FIELDS = tuple(s for s in KNOWN_SLOTS if s != "views")
# Ranges shared by the server and the CLI; the server may lower the upper bounds of beams and new tokens.
TEMPERATURE_MAX = 5.0
REPETITION_PENALTY_MAX = 10.0


class StudyInputError(UserError):
    """A request value that cannot be used: the field (form field / flag stem) and what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _range(name: str, value, lo, hi, lo_open: bool = False):
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise StudyInputError(name, "must be a finite number")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        right = f"{hi}]" if hi is not None else "inf)"
        raise StudyInputError(name, f"{value} is out of range {left}{lo}, {right}")
    return value


def check_decoding(num_beams: int | None = 1, max_new_tokens: int | None = None, do_sample: bool = False,
                   temperature: float | None = None, top_p: float | None = None,
                   repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None, *,
                   max_beams: int | None = None, max_new_tokens_limit: int | None = None,
                   default_max_new_tokens: int | None = None, sample_name: str = "do_sample=true",
                   **other) -> dict:
    """Validated `generate()` settings: absurd values and settings that would be ignored are refused.

    Returns {num_beams, max_new_tokens, do_sample[, temperature, top_p][, repetition_penalty]
    [, no_repeat_ngram_size]}; temperature and top_p only with sampling (1.0 when not given).
    sample_name: how the caller spells "sampling on" in messages (the CLI's --sample).
    other: further `generate()` settings of library callers (min_new_tokens, length_penalty...), passed through.
    """
    num_beams = _range("num_beams", 1 if num_beams is None else num_beams, 1, max_beams)
    max_new = _range("max_new_tokens", max_new_tokens if max_new_tokens is not None else default_max_new_tokens,
                     1, max_new_tokens_limit)
    _range("temperature", temperature, 0.0, TEMPERATURE_MAX, lo_open=True)
    _range("top_p", top_p, 0.0, 1.0, lo_open=True)
    _range("repetition_penalty", repetition_penalty, 0.0, REPETITION_PENALTY_MAX, lo_open=True)
    _range("no_repeat_ngram_size", no_repeat_ngram_size, 0, None)
    if do_sample and num_beams > 1:
        raise StudyInputError("num_beams", f"beam search and sampling do not combine: use num_beams 1 with "
                                           f"{sample_name}")
    if not do_sample:
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if value is not None and value != 1.0:
                raise StudyInputError(name, f"only applies with {sample_name} (sampling); greedy and beam search "
                                            "would ignore it")
    out = {"num_beams": num_beams, "max_new_tokens": max_new, "do_sample": bool(do_sample)}
    if do_sample:
        out["temperature"] = 1.0 if temperature is None else temperature
        out["top_p"] = 1.0 if top_p is None else top_p
    if repetition_penalty is not None:
        out["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size is not None:
        out["no_repeat_ngram_size"] = no_repeat_ngram_size
    return {**other, **out}


def check_views(n_images: int, views: list | None, max_views: int | None) -> list[str | None]:
    """One canonical view name (or None) per image, as manifests write them (normalize_view).

    views: None or empty (all unknown), or one entry per image ("" / None for unknown).
    """
    if n_images < 1:
        raise StudyInputError("images", "give at least one image (PNG, JPEG or DICOM), one per view")
    if max_views is not None and n_images > max_views:
        raise StudyInputError("images", f"{n_images} images given; this model takes at most {max_views} views per "
                                        f"study (it was trained with data.max_views={max_views})")
    views = list(views or [])
    if views and len(views) != n_images:
        raise StudyInputError("views", f"{len(views)} view(s) for {n_images} image(s): give one per image "
                                       "(an empty value for unknown) or none")
    out = []
    for i, v in enumerate(views or [None] * n_images):
        raw = (v or "").strip()
        if raw and (len(raw) > 32 or not all(c.isalnum() or c in " _-" for c in raw)):
            raise StudyInputError("views", f"view {i}: expected a view name such as PA, AP or LATERAL")
        out.append(normalize_view(raw) if raw else None)
    return out


def check_context(context: dict | None) -> dict:
    """Clinical context slot -> value; unknown names are refused (`views` come with the images)."""
    context = dict(context or {})
    for name, value in context.items():
        if name not in CONTEXT_FIELDS:
            raise StudyInputError(name, f"not a clinical context field (known: {', '.join(CONTEXT_FIELDS)}; "
                                        "views come one per image)")
        if isinstance(value, str) and "\x00" in value:
            raise StudyInputError(name, "contains a NUL character")
    return {k: v for k, v in context.items() if v not in (None, "", [])}


def study_record(images: list, views: list[str | None], context: dict | None = None, key: str = "path",
                 study_id: str = "study") -> dict:
    """The manifest-like record of one request: what the training collator would have seen for this study.

    images: paths (key="path") or decoded images (key="image", the server's uploads).
    """
    return {"id": study_id, "images": [{key: im, "view": v} for im, v in zip(images, views)],
            **check_context(context)}
