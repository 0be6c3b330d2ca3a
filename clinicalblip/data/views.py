"""View names for manifest images.

A manifest image's `view` is an upper-case string. The common ones are canonical:

- "PA", "AP": frontal views whose projection is known (MIMIC-CXR ViewPosition, DICOM ViewPosition).
- "FRONTAL": a frontal view whose PA/AP projection is not recorded (IU X-Ray's projections CSV says only
  "Frontal").
- "LATERAL": any lateral (MIMIC's "LATERAL" and "LL", "left lateral", "cross-table lateral", IU "Lateral").

Anything else is kept upper-cased as the source wrote it ("AP AXIAL", "PA LLD", "LAO", "SWIMMERS"), and
`view_kind` tells frontal from lateral for all of them. None means the source did not say.
"""

from __future__ import annotations

_CANONICAL = {
    "PA": "PA", "POSTEROANTERIOR": "PA", "POSTERO-ANTERIOR": "PA", "P-A": "PA",
    "AP": "AP", "ANTEROPOSTERIOR": "AP", "ANTERO-POSTERIOR": "AP", "A-P": "AP",
    "FRONTAL": "FRONTAL", "FRONT": "FRONTAL",
    "LATERAL": "LATERAL", "LAT": "LATERAL", "LL": "LATERAL", "RL": "LATERAL", "LEFT LATERAL": "LATERAL",
    "RIGHT LATERAL": "LATERAL", "XTABLE LATERAL": "LATERAL", "CROSS-TABLE LATERAL": "LATERAL",
    "CROSS TABLE LATERAL": "LATERAL", "LATERAL LEFT": "LATERAL", "LATERAL RIGHT": "LATERAL",
}
FRONTAL_VIEWS = ("PA", "AP", "FRONTAL")


def normalize_view(raw) -> str | None:
    """Canonical view name for a source's label ("Frontal" -> "FRONTAL", "LL" -> "LATERAL"); None if blank."""
    if raw is None:
        return None
    if isinstance(raw, float) and raw != raw:  # NaN from pandas-made files
        return None
    s = " ".join(str(raw).replace("_", " ").split()).upper()
    if not s or s in ("NAN", "NONE", "UNKNOWN", "NULL"):
        return None
    return _CANONICAL.get(s, s)


def view_kind(view: str | None) -> str | None:
    """"frontal", "lateral" or "other" for a view name; None when the view is unknown."""
    v = normalize_view(view)
    if v is None:
        return None
    if v in FRONTAL_VIEWS or v.startswith(("PA ", "AP ")):
        return "frontal"
    if "LAT" in v.split() or v == "LATERAL" or v.endswith(" LATERAL"):
        return "lateral"
    return "other"


def view_order(view: str | None) -> int:
    """Sort key that puts frontal images first, then laterals, then the rest (stable within a kind)."""
    return {"frontal": 0, "lateral": 1, "other": 2}.get(view_kind(view) or "", 3)
