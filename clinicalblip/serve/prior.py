"""The prior study in a served request: the form fields, validated and turned into ReportModel's prior.

    prior_images  files, one per prior view (frontal first), for a model trained with data.prior images | both
    prior_views   a view name per prior image (optional)
    prior_report  the prior study's report text (data.prior report | both)
    prior_date    the prior study's date, YYYY-MM-DD
    study_date    this study's date, YYYY-MM-DD (with prior_date: the interval the prompt shows)

A prior the model does not take is refused (422) naming the field and the model's data.prior.
"""

from __future__ import annotations

from clinicalblip.errors import UserError
from clinicalblip.serve.forms import Form, FormError

PRIOR_FIELDS = ("prior_images", "prior_views", "prior_report", "prior_date", "study_date")


def prior_from_form(service, form: Form) -> dict | None:
    """The request's prior ({"images": [PIL], "views", "report", "study_date", "interval_days"}) or None."""
    from clinicalblip.data.priors import interval_days, parse_date

    files = [f for f in form.files if f.field == "prior_images"]
    report = form.one("prior_report")
    pdate, sdate = form.one("prior_date"), form.one("study_date")
    views = [(v.strip().upper() or None) for v in form.fields.get("prior_views", [])]
    for name, value in (("prior_report", report), ("prior_date", pdate), ("study_date", sdate)):
        if value is not None and "\x00" in value:
            raise FormError(422, name, "contains a NUL character")
    report = report.strip() if report and report.strip() else None
    if not files and not report:
        for name, value in (("prior_date", pdate), ("prior_views", views)):
            if value:
                raise FormError(422, name, "given without a prior study: add prior_images and/or prior_report")
        return None
    model_prior = getattr(service.front, "prior", "none")
    if files and model_prior not in ("images", "both"):
        raise FormError(422, "prior_images", f"this model was trained with data.prior={model_prior}: it takes no "
                                             "prior images")
    if report and model_prior not in ("report", "both"):
        raise FormError(422, "prior_report", f"this model was trained with data.prior={model_prior}: it takes no "
                                             "prior report")
    limit = getattr(service.front, "max_prior_views", 1)
    if len(files) > limit:
        raise FormError(422, "prior_images", f"{len(files)} prior images given; this model takes at most {limit}")
    if views and len(views) != len(files):
        raise FormError(422, "prior_views", f"{len(views)} view(s) for {len(files)} prior image(s)")
    for name, value in (("prior_date", pdate), ("study_date", sdate)):
        if value and parse_date(value) is None:
            raise FormError(422, name, "not a date (YYYY-MM-DD)")
    prior = {"images": [service.decode_image(f.data, f.filename, f"prior_images[{i}]") for i, f in enumerate(files)],
             "views": views or None, "report": report, "study_date": pdate}
    if pdate and sdate:
        days = interval_days({"study_date": sdate, "prior": {"study_date": pdate}})
        if days is not None and days < 0:
            raise FormError(422, "prior_date", "the prior study is dated after this study")
        prior["interval_days"] = days
    return {k: v for k, v in prior.items() if v not in (None, [])}


def attach_form_prior(service, record: dict, form: Form) -> str | None:
    """Put the request's prior on the record; returns what the prompt shows of it (report | images | both)."""
    from clinicalblip.priorinput import attach_prior

    prior = prior_from_form(service, form)
    if prior is None:
        return None
    try:
        attach_prior(record, prior, getattr(service.front, "prior", "none"))
    except UserError as exc:
        raise FormError(422, "prior_images" if prior.get("images") else "prior_report", str(exc)) from None
    for im in record["prior"]["images"]:  # PIL images ride in "image", as the current views do
        im["image"] = im.pop("path")
    return "both" if prior.get("images") and prior.get("report") else ("images" if prior.get("images") else "report")
