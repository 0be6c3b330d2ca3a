"""The prior study as generation input: what a model takes (its data.prior, recorded in the stage folder's
config.yaml and the release's clinicalblip.json), the prior ablations, and refusing input that does not match.

Shared by generate (one study or a manifest split), ReportModel.report and serve; the data side (linking,
checks, prompt slot) is clinicalblip/data/priors.py.
"""

from __future__ import annotations

import sys

from clinicalblip.data.priors import PRIOR_MODES, has_prior
from clinicalblip.errors import UserError

_PARTS = {"none": set(), "report": {"report"}, "images": {"images"}, "both": {"report", "images"}}


def prior_mode_for(model_prior: str, want: str | None) -> str:
    """The data.prior a collator uses when `want` is asked of a model trained with `model_prior`.

    want None (or "model"): what the model takes. "none" withholds the prior (always allowed). Asking for a part
    the model was not trained with is refused, naming the setting.
    """
    model_prior = model_prior or "none"
    if want in (None, "model"):
        return model_prior
    if want not in PRIOR_MODES:
        raise UserError(f"unknown prior input '{want}' (known: model, {', '.join(PRIOR_MODES)})")
    missing = _PARTS[want] - _PARTS[model_prior]
    if missing:
        raise UserError(f"this model was trained with data.prior={model_prior}: it does not take the prior's "
                        f"{' and '.join(sorted(missing))} (asked for prior input '{want}'); use a model trained "
                        f"with data.prior={want} or both")
    return want


def attach_prior(record: dict, prior: dict, model_prior: str) -> dict:
    """Put a single study's prior (generate --prior-*, serve, ReportModel.report) on its record, refusing a part
    the model does not take: {"images": [paths or PIL images], "views": [...], "report": text (or "findings" /
    "impression"), "study_date" (of the prior) / "interval_days"}."""
    if not isinstance(prior, dict):
        raise UserError("prior must be a mapping: {'images': [...], 'report': text, 'study_date' or 'interval_days'}")
    known = {"images", "views", "report", "findings", "impression", "study_date", "interval_days", "date"}
    extra = sorted(set(prior) - known)
    if extra:
        raise UserError(f"unknown prior key '{extra[0]}' (known: {', '.join(sorted(known))})")
    images = list(prior.get("images") or [])
    views = list(prior.get("views") or [])
    if views and len(views) != len(images):
        raise UserError(f"{len(images)} prior image(s) but {len(views)} prior view name(s)")
    text = prior.get("report") or prior.get("findings")
    parts = ({"images"} if images else set()) | ({"report"} if text or prior.get("impression") else set())
    model_prior = model_prior or "none"
    if not parts:
        raise UserError("the prior has neither images nor a report")
    missing = parts - _PARTS[model_prior]
    if missing:
        flag = {"images": "a prior image (--prior-image)", "report": "a prior report (--prior-report)"}
        raise UserError(f"this model was trained with data.prior={model_prior}: it takes no "
                        f"{' and no '.join(flag[p] for p in sorted(missing))}; leave it out or use a model trained "
                        "with the prior")
    emb = {"images": [{"path": im, "view": (views[i] if views else ("PA" if i == 0 else None))}
                      for i, im in enumerate(images)]}
    if text:
        emb["findings"] = str(text)
    if prior.get("impression"):
        emb["impression"] = str(prior["impression"])
    date = prior.get("study_date") or prior.get("date")
    if date:
        from clinicalblip.data.priors import parse_date

        if parse_date(date) is None:
            raise UserError(f"prior date {date!r} is not a date (YYYY-MM-DD)")
        emb["study_date"] = str(date)
    if prior.get("interval_days") not in (None, ""):
        try:
            record["interval_days"] = int(prior["interval_days"])
        except (TypeError, ValueError):
            raise UserError(f"interval_days {prior['interval_days']!r} is not a whole number of days") from None
    record["prior"] = emb
    return record


def note_unused_priors(records: list[dict], model_prior: str) -> int:
    """Say once (stderr) how many studies have a linked prior that a model without priors will not see."""
    n = sum(1 for r in records if has_prior(r))
    if n and (model_prior or "none") == "none":
        print(f"note: {n} of {len(records)} studies have a prior study, but this model was trained with "
              "data.prior=none: the priors are not shown to it", file=sys.stderr)
    return n


def prior_row_fields(record: dict, collate) -> dict:
    """What a predictions row records about the prior: has_prior (the study has one, shown or not) and
    prior_shown (none | report | images | both: what the prompt showed)."""
    hp = has_prior(record)
    shown = "none"
    if hp and collate.prior != "none":
        text, images = collate.prior_inputs(record)
        shown = {(True, True): "both", (True, False): "report", (False, True): "images"}.get(
            (bool(text), bool(images)), "none")
    return {"has_prior": hp, "prior_shown": shown}
