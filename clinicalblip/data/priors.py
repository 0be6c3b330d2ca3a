"""The prior study: the one place that links a study to its previous one, checks the links, and says what
of the prior a prompt shows.

A manifest record names its prior in one of two ways:

    "prior_id": "s123"                       another record of the same manifest (same patient, same split,
                                             earlier date)
    "prior": {"images": [{"path", "view"}],  an embedded prior (a study outside the manifest): its images
              "findings", "impression",      (paths relative to the manifest's folder), its report and its
              "study_date"}                  date; every key optional

plus its own `study_date` (ISO "YYYY-MM-DD") or `interval_days` (days since the prior). `link_priors` resolves
`prior_id` into the same embedded form (`record["prior"]`, with the prior's id), so everything downstream
(collate, generate, serve) reads one shape. `prior_problems` is what `data check` reports about the links.

Model input (`data.prior`): none | report | images | both. The prior's images become extra image blocks after
the current views (one Q-Former pass each, like a view), named in the prompt's views ("prior PA"); its report
fills the template's `{prior}` slot, which is the first slot shortened when a prompt is too long.
"""

from __future__ import annotations

import datetime as _dt
import hashlib

PRIOR_MODES = ("none", "report", "images", "both")
# data check codes (errors: a broken link makes the record unusable)
PRIOR_ERRORS = ("prior_missing", "prior_other_patient", "prior_later", "prior_other_split", "prior_cycle",
                "prior_bad")


def parse_date(value) -> _dt.date | None:
    """An ISO date ("2019-03-04", also "2019-03-04T10:20" or "20190304"); None when absent or unreadable."""
    if value in (None, ""):
        return None
    s = str(value).strip()
    for fmt, n in (("%Y-%m-%d", 10), ("%Y%m%d", 8)):
        try:
            return _dt.datetime.strptime(s[:n], fmt).date()
        except ValueError:
            continue
    return None


def prior_fields(prior_rec: dict) -> dict:
    """The embedded form of a record used as a prior: what a prompt can show of it."""
    out = {"id": prior_rec.get("id"), "images": [dict(im) for im in prior_rec.get("images") or []]}
    for key in ("findings", "impression", "study_date"):
        if prior_rec.get(key) not in (None, ""):
            out[key] = prior_rec[key]
    return out


def link_priors(records: list[dict]) -> int:
    """Resolve every `prior_id` into `record["prior"]` (in place; an embedded prior is kept as it is).

    A link that cannot be resolved (unknown id) is left for `data check` to report. Returns the number of
    records that have a prior afterwards. Call it on the whole manifest, before keeping one split.
    """
    by_id = {str(r.get("id")): r for r in records if r is not None and r.get("id") not in (None, "")}
    n = 0
    for r in records:
        if r is None:
            continue
        pid = r.get("prior_id")
        if pid not in (None, "") and str(pid) in by_id and str(pid) != str(r.get("id")):
            r["prior"] = prior_fields(by_id[str(pid)])
        if isinstance(r.get("prior"), dict):
            n += 1
    return n


def interval_days(record: dict) -> int | None:
    """Days between the prior and this study: `interval_days`, else from the two dates."""
    v = record.get("interval_days")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    prior = record.get("prior") if isinstance(record.get("prior"), dict) else {}
    a, b = parse_date(prior.get("study_date")), parse_date(record.get("study_date"))
    return (b - a).days if a and b else None


def prior_report_text(record: dict) -> str | None:
    """The prompt's `{prior}` slot: "(120 days earlier) <prior findings>" (its impression when it has no
    findings), or None when the record has no prior report."""
    prior = record.get("prior")
    if not isinstance(prior, dict):
        return None
    # the findings (they hold every finding with its size); the impression only when there are none
    text = " ".join(str(prior.get("findings") or "").split()) or " ".join(str(prior.get("impression") or "").split())
    if not text:
        return None
    days = interval_days(record)
    when = f"({days} days earlier) " if days is not None else (
        f"({prior['study_date']}) " if prior.get("study_date") else "")
    return when + text


def prior_images(record: dict, max_prior_views: int) -> list[dict]:
    """The prior's images a prompt shows: frontal first (as for the current views), at most max_prior_views."""
    prior = record.get("prior")
    if not isinstance(prior, dict) or max_prior_views <= 0:
        return []
    from clinicalblip.data.collate import ordered_images  # the one view order

    return ordered_images({"images": prior.get("images") or []}, max_prior_views)


def has_prior(record: dict) -> bool:
    return isinstance(record.get("prior"), dict) or record.get("prior_id") not in (None, "")


def prior_parts(mode: str, dropout: float = 0.0, seed: int = 0, epoch: int = 0, rid: str = "") -> tuple[bool, bool]:
    """(show the prior report, show the prior images) for data.prior = mode, after training's prior_dropout.

    Dropout withholds one part, never both: a prompt that shows no prior always belongs to a study whose
    reference has no comparison, so the model never learns to write change language without a prior.
    """
    report, images = mode in ("report", "both"), mode in ("images", "both")
    if dropout > 0 and report and images:
        h = hashlib.blake2b(f"prior:{seed}:{epoch}:{rid}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        if u < dropout / 2:
            report = False
        elif u < dropout:
            images = False
    return report, images


def prior_problems(records: list[dict]) -> list[list[tuple[str, str]]]:
    """Per record, the broken prior links as (code, detail): a prior_id that names no record (prior_missing),
    the record itself or a chain that comes back (prior_cycle), another patient's study (prior_other_patient),
    a study in another split (prior_other_split), a study dated after this one (prior_later); an embedded
    `prior` that is not an object or has neither images nor report (prior_bad)."""
    by_id = {str(r.get("id")): r for r in records if r is not None and r.get("id") not in (None, "")}
    out: list[list[tuple[str, str]]] = [[] for _ in records]
    for i, r in enumerate(records):
        if r is None:
            continue
        ps = out[i]
        emb = r.get("prior")
        pid = r.get("prior_id")
        if emb is not None and pid in (None, ""):
            if not isinstance(emb, dict):
                ps.append(("prior_bad", f"'prior' is a {type(emb).__name__}, not an object"))
            elif not (emb.get("images") or emb.get("findings") or emb.get("impression")):
                ps.append(("prior_bad", "embedded prior has neither images nor findings/impression"))
            elif emb.get("study_date") and r.get("study_date"):
                a, b = parse_date(emb.get("study_date")), parse_date(r.get("study_date"))
                if a and b and a > b:
                    ps.append(("prior_later", f"embedded prior dated {a} after the study ({b})"))
            continue
        if pid in (None, ""):
            continue
        pid = str(pid)
        if pid == str(r.get("id")):
            ps.append(("prior_cycle", f"prior_id {pid!r} is the record itself"))
            continue
        p = by_id.get(pid)
        if p is None:
            ps.append(("prior_missing", f"prior_id {pid!r} is not in the manifest"))
            continue
        if str(p.get("patient_id")) != str(r.get("patient_id")):
            ps.append(("prior_other_patient", f"prior {pid} belongs to patient {p.get('patient_id')}, "
                                              f"not {r.get('patient_id')}"))
        if p.get("split") != r.get("split"):
            ps.append(("prior_other_split", f"prior {pid} is in split {p.get('split')}, this study in "
                                            f"{r.get('split')}"))
        a, b = parse_date(p.get("study_date")), parse_date(r.get("study_date"))
        if a and b and a > b:
            ps.append(("prior_later", f"prior {pid} is dated {a}, after this study ({b})"))
        # follow the chain: a cycle never reaches a study without a prior
        seen, cur = {str(r.get("id"))}, p
        while cur is not None and cur.get("prior_id") not in (None, ""):
            nxt = str(cur["prior_id"])
            if nxt in seen:
                ps.append(("prior_cycle", f"the prior chain from {r.get('id')} comes back to {nxt}"))
                break
            seen.add(nxt)
            cur = by_id.get(nxt)
    return out


def check_prior_template(mode: str, template) -> None:
    """Refuse data.prior values the template cannot show (the report needs a `{prior}` slot)."""
    from clinicalblip.errors import UserError

    if mode not in PRIOR_MODES:
        raise UserError(f"data.prior must be one of {', '.join(PRIOR_MODES)}, got {mode!r}")
    if mode in ("report", "both") and "prior" not in (template.slots or []):
        raise UserError(f"data.prior={mode} shows the prior report in the prompt's {{prior}} slot, but template "
                        f"'{template.name}' has none: use a template with a {{prior}} slot (findings_with_context) "
                        "or data.prior=images")


def prior_mode_for_template(mode: str, template) -> str:
    """The data.prior a template can show: without a `{prior}` slot the report part is dropped."""
    if "prior" in (template.slots or []):
        return mode
    return {"both": "images", "report": "none"}.get(mode, mode)


def prior_inputs(record: dict, mode: str, max_prior_views: int, dropout: float = 0.0, seed: int = 0,
                 epoch: int = 0) -> tuple[str | None, list[dict]]:
    """(prior report text or None, prior images) a prompt shows for this record under data.prior = mode."""
    if mode == "none" or not isinstance(record.get("prior"), dict):
        return None, []
    text, images = prior_report_text(record), prior_images(record, max_prior_views)
    show_report, show_images = prior_parts(mode, dropout, seed, epoch, str(record.get("id")))
    if dropout > 0 and not (text and images):
        show_report, show_images = mode in ("report", "both"), mode in ("images", "both")  # one part: keep it
    return (text if show_report else None), (images if show_images else [])


def add_prior_context(ctx: dict, report: str | None, images: list[dict]) -> dict:
    """Fill the template's `{prior}` slot and name the prior's images after the current views ("prior PA")."""
    if report:
        ctx["prior"] = report
    if images:
        ctx["views"] = list(ctx.get("views") or []) + [f"prior {im.get('view') or 'image'}" for im in images]
    return ctx


def link_by_date(records: list[dict], times: dict[str, tuple[str, str]]) -> dict:
    """Give each record the same patient's latest earlier study as `prior_id` (adapters without explicit links:
    MIMIC-CXR). times: record id -> (date "YYYY-MM-DD", time "HHMMSS..." or ""); studies of one day are ordered by
    time, and two studies at the same date and time are not linked to each other. A study without a date is
    neither linked nor a prior. A prior in another split is not linked (it would leak across the split).

    Sets `study_date` on every dated record. Returns counts for the prepare summary: linked, without_date,
    prior_in_other_split.
    """
    by_patient: dict[str, list[tuple[tuple[str, str], dict]]] = {}
    undated = 0
    for r in records:
        t = times.get(str(r.get("id")))
        if not t or not t[0]:
            undated += 1
            continue
        r["study_date"] = t[0]
        if r.get("patient_id") not in (None, ""):
            by_patient.setdefault(str(r["patient_id"]), []).append(((t[0], t[1] or ""), r))
    linked = other_split = 0
    for studies in by_patient.values():
        studies.sort(key=lambda x: x[0])
        for i, (key, r) in enumerate(studies):
            j = i - 1
            while j >= 0 and studies[j][0] == key:  # same date and time: not earlier
                j -= 1
            if j < 0:
                continue
            prior = studies[j][1]
            if prior.get("split") != r.get("split"):
                other_split += 1
                continue
            r["prior_id"] = prior["id"]
            linked += 1
    return {"linked": linked, "without_date": undated, "prior_in_other_split": other_split}
