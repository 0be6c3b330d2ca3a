"""The built-in synthetic dataset: procedural chest radiographs, clinical context and template reports.

Every study draws five findings (``FINDINGS``) from a seeded model, renders a frontal (PA) and usually a
lateral view in which the findings are visible, writes an indication that carries real but imperfect prior
information, and composes a report that describes exactly what was drawn. ``label_report`` reads the five
findings back from report text (the reports' own sentence bank, and imperfect generated text).

Patients: about a third have one study; the others have 2-4 studies over time (``study_date``,
``prior_id`` = the patient's previous study, ``interval_days``). Between a patient's studies each finding
persists, grows, shrinks, resolves or appears (stored as the extra key ``change``: finding -> new | worse |
better | unchanged | resolved), is drawn at its new size in the images, and the later report describes it
against the prior from a change-phrase bank ("Increased left pleural effusion, now moderate.", "Interval
resolution of the right pneumothorax."). Whether it grew or shrank can be read only from the prior (its
images or its report). A study without a prior never mentions a comparison.

Conventions: images are 8-bit grayscale; in the frontal view the patient's right is on the image's left
(as on a real PA film); in the lateral view anterior is on the image's left.

Indications come in three kinds (stored as the extra key ``indication_type``):
  informative   a symptom/history phrase tied to a finding that IS present (subtle findings are mentioned
                more often, so the indication disambiguates exactly the hard cases),
  misleading    the same phrases naming a finding that is ABSENT ("Rule out pneumothorax."),
  uninformative routine phrases ("Routine chest radiograph." = ``GENERIC_INDICATION`` among them).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from clinicalblip.data.manifest import write_manifest
from clinicalblip.prompts import GENERIC_INDICATION

__all__ = [
    "FINDINGS",
    "GENERIC_INDICATION",
    "UNINFORMATIVE_INDICATIONS",
    "write_synthetic_dataset",
    "label_report",
    "sample_labels",
    "sample_details",
    "render_study",
    "compose_report",
]

FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "nodule")

# ---------------------------------------------------------------------------------------------------------
# The clinical model
# ---------------------------------------------------------------------------------------------------------
P_NORMAL = 0.37  # share of studies with no finding at all
# per-finding probabilities among abnormal studies (redrawn until at least one is present)
_Q = {"cardiomegaly": 0.27, "pleural_effusion": 0.22, "pneumothorax": 0.22, "consolidation": 0.28, "nodule": 0.26}
_Q_EFFUSION_WITH_CARDIOMEGALY = 0.45  # heart failure: effusion more likely with an enlarged heart
SUBTLE_RATE = 0.25  # share of present findings rendered subtly
P_MISSING_LATERAL = 0.05
P_SINGLE_STUDY = 0.35  # share of patients with one study; the others have 2-4 studies over time
# Between two studies of a patient: a present finding stays (unchanged), grows (worse), shrinks (better) or
# resolves; an absent one appears (new) with its own probability.
_P_TRANSITION = {"unchanged": 0.4, "worse": 0.2, "better": 0.2, "resolved": 0.2}
_P_RESOLVE = {"cardiomegaly": 0.05, "nodule": 0.1}  # chronic findings rarely resolve
_P_NEW = {"cardiomegaly": 0.06, "pleural_effusion": 0.12, "pneumothorax": 0.08, "consolidation": 0.12,
          "nodule": 0.06}
CHANGES = ("new", "worse", "better", "unchanged", "resolved")

# indication kind probabilities: (informative, misleading); the rest is uninformative
_P_IND_ABNORMAL = (0.68, 0.10)
_P_IND_NORMAL = (0.0, 0.25)
_SUBTLE_MENTION_WEIGHT = 3.0

UNINFORMATIVE_INDICATIONS = (
    GENERIC_INDICATION,
    "Preoperative evaluation.",
    "Annual physical.",
    "Pre-employment screening.",
    "Routine follow-up.",
    "Medical clearance.",
    "Screening examination.",
)

# phrases tied to each finding; {side} is filled with the finding's side (random when misleading)
_INDICATION_PHRASES = {
    "cardiomegaly": (
        "Shortness of breath, history of congestive heart failure.",
        "Dyspnea and leg swelling.",
        "Evaluate heart size.",
        "History of heart failure, increasing dyspnea.",
        "Evaluate for cardiomegaly.",
    ),
    "pleural_effusion": (
        "Shortness of breath, history of congestive heart failure.",
        "Decreased breath sounds at the {side} base.",
        "Evaluate for pleural effusion.",
        "Dyspnea, dullness to percussion.",
    ),
    "pneumothorax": (
        "Chest trauma, sudden pleuritic pain.",
        "Rule out pneumothorax.",
        "Sudden onset {side} chest pain and dyspnea.",
        "Status post fall, rib pain.",
        "Evaluate for pneumothorax.",
    ),
    "consolidation": (
        "Fever and productive cough.",
        "Evaluate for pneumonia.",
        "Cough and fever, rule out pneumonia.",
        "Fever and elevated white count.",
        "Crackles at the {side} base.",
    ),
    "nodule": (
        "Follow-up of known pulmonary nodule.",
        "Abnormal finding on prior CT, evaluate nodule.",
        "Weight loss and hemoptysis.",
        "Evaluate for lung mass.",
        "Smoker with chronic cough.",
    ),
}

_HISTORY_GENERIC = ("Smoker.", "Former smoker.", "Hypertension.", "Diabetes.", "Asthma.",
                    "No significant past medical history.")
_HISTORY_FOR = {
    "cardiomegaly": ("History of congestive heart failure.", "Hypertension."),
    "nodule": ("Smoker.", "Former smoker.", "History of lung cancer."),
}


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_labels(rng: np.random.Generator) -> dict[str, int]:
    """Draw the five findings: ~37% fully normal, each finding ~0.2 overall, effusion tied to cardiomegaly."""
    if rng.random() < P_NORMAL:
        return {f: 0 for f in FINDINGS}
    while True:
        labels = {}
        for f in FINDINGS:
            q = _Q[f]
            if f == "pleural_effusion" and labels["cardiomegaly"]:
                q = _Q_EFFUSION_WITH_CARDIOMEGALY
            labels[f] = int(rng.random() < q)
        if any(labels.values()):
            return labels


def _sample_subtle(labels, rng) -> list[str]:
    return [f for f in FINDINGS if labels[f] and rng.random() < SUBTLE_RATE]


def _side_word(details, f, rng):
    side = details.get(f, {}).get("side") if details else None
    if side is None:
        side = _pick(rng, ("right", "left"))
    if side == "bilateral":
        side = _pick(rng, ("right", "left"))
    return side


def _indication(labels, subtle, details, rng) -> tuple[str, str, str | None]:
    """Return (indication text, kind, finding it names or None)."""
    present = [f for f in FINDINGS if labels[f]]
    absent = [f for f in FINDINGS if not labels[f]]
    p_inf, p_mis = _P_IND_ABNORMAL if present else _P_IND_NORMAL
    u = rng.random()
    if u < p_inf:
        w = np.array([_SUBTLE_MENTION_WEIGHT if f in subtle else 1.0 for f in present])
        f = present[int(rng.choice(len(present), p=w / w.sum()))]
        text = _pick(rng, _INDICATION_PHRASES[f]).format(side=_side_word(details, f, rng))
        return text, "informative", f
    if u < p_inf + p_mis and absent:
        f = _pick(rng, absent)
        text = _pick(rng, _INDICATION_PHRASES[f]).format(side=_side_word(None, f, rng))
        return text, "misleading", f
    return _pick(rng, UNINFORMATIVE_INDICATIONS), "uninformative", None


def _history(labels, rng) -> str | None:
    for f, phrases in _HISTORY_FOR.items():
        if labels[f] and rng.random() < 0.3:
            return _pick(rng, phrases)
    if rng.random() < 0.45:
        return None
    return _pick(rng, _HISTORY_GENERIC)


# ---------------------------------------------------------------------------------------------------------
# Finding details (shared by the renderer and the report): fixed number of draws whatever the labels
# ---------------------------------------------------------------------------------------------------------
_NODULE_SIZES = (("8 mm", 0.045), ("1 cm", 0.065), ("1.5 cm", 0.075), ("2 cm", 0.085))
_NODULE_ZONES = {  # (dx range, dy range) in lung-normalised coordinates; dx > 0 is lateral
    "upper": ((-0.35, 0.45), (-0.65, -0.35)),
    "mid": ((-0.30, 0.55), (-0.20, 0.10)),
    "lower": ((0.10, 0.55), (0.20, 0.42)),
}


def _as_set(subtle) -> set:
    if isinstance(subtle, dict):
        return {f for f, v in subtle.items() if v}
    if isinstance(subtle, str):
        return {subtle}
    return set(subtle or ())


def sample_details(labels: dict, subtle, rng: np.random.Generator) -> dict:
    """Severity, side and location of every finding (drawn even when absent, so rendering is comparable)."""
    subtle = _as_set(subtle)
    u = rng.random(24)
    d = {}
    # cardiomegaly: cardiothoracic ratio
    if labels.get("cardiomegaly"):
        if "cardiomegaly" in subtle:
            sev, ctr = "mild", 0.49 + 0.03 * u[1]
        elif u[0] < 0.5:
            sev, ctr = "moderate", 0.57 + 0.04 * u[1]
        else:
            sev, ctr = "marked", 0.63 + 0.04 * u[1]
    else:
        sev, ctr = None, 0.37 + 0.07 * u[1]
    d["cardiomegaly"] = {"severity": sev, "ctr": float(ctr)}
    # pleural effusion: side, height of the fluid (fraction of lung height units), opacity
    side = "right" if u[2] < 0.4 else ("left" if u[2] < 0.8 else "bilateral")
    if "pleural_effusion" in subtle:
        size, h, alpha = "small", 0.07 + 0.02 * u[4], 0.6
    else:
        k = int(u[3] * 3)
        size = ("small", "moderate", "large")[k]
        h = (0.12, 0.18, 0.26)[k] + 0.04 * u[4]
        alpha = 1.0
    d["pleural_effusion"] = {"side": side, "size": size, "height": float(h), "alpha": alpha}
    # pneumothorax: side, collapsed-lung scale, darkness
    side = "right" if u[5] < 0.5 else "left"
    if "pneumothorax" in subtle:
        size, f, alpha = "small", 0.81 + 0.03 * u[7], 0.75
    else:
        k = int(u[6] * 3)
        size = ("small", "moderate", "large")[k]
        f = (0.62, 0.52, 0.42)[k] + 0.04 * u[7]
        alpha = 1.0
    d["pneumothorax"] = {"side": side, "size": size, "scale": float(f), "alpha": alpha}
    # consolidation: lobe, centre offset, radii, opacity
    side = "right" if u[8] < 0.5 else "left"
    lobe = "upper" if u[9] < 0.5 else "lower"
    sub = "consolidation" in subtle
    d["consolidation"] = {
        "side": side, "lobe": lobe,
        "dx": float(-0.1 + 0.35 * u[10]), "dy": float((-0.45 if lobe == "upper" else 0.2) + 0.15 * u[11]),
        "rx": float((0.06 if sub else 0.11) + 0.025 * u[12]), "ry": float((0.055 if sub else 0.10) + 0.025 * u[13]),
        "alpha": 0.5 if sub else 1.0, "patchy": bool(u[14] < 0.5),
    }
    # nodule: size, side, zone, position inside the zone
    side = "right" if u[15] < 0.5 else "left"
    zone = ("upper", "mid", "lower")[int(u[16] * 3)]
    if "nodule" in subtle:
        size_word, radius, alpha = _NODULE_SIZES[0][0], _NODULE_SIZES[0][1], 0.6
    else:
        size_word, radius = _NODULE_SIZES[1 + int(u[17] * 3)]
        alpha = 1.0
    (x0, x1), (y0, y1) = _NODULE_ZONES[zone]
    d["nodule"] = {"side": side, "zone": zone, "size": size_word, "radius": radius, "alpha": alpha,
                   "dx": float(x0 + (x1 - x0) * u[18]), "dy": float(y0 + (y1 - y0) * u[19])}
    return d


# ---------------------------------------------------------------------------------------------------------
# Change over time: severity levels, and the next study's findings drawn from the prior's
# ---------------------------------------------------------------------------------------------------------
# Severity levels per finding (0 = smallest): the word the report uses and the value the renderer draws.
_LEVELS = {
    "cardiomegaly": (("mild", 0.50), ("moderate", 0.585), ("marked", 0.65)),
    "pleural_effusion": (("small", 0.12), ("moderate", 0.18), ("large", 0.26)),
    "pneumothorax": (("small", 0.62), ("moderate", 0.52), ("large", 0.42)),
    "consolidation": (("small", 0.07), ("moderate", 0.11), ("large", 0.15)),
    "nodule": tuple(_NODULE_SIZES),
}
# the keys of a finding's details that say where it is (kept while it persists)
_PLACE_KEYS = {"cardiomegaly": (), "pleural_effusion": ("side",), "pneumothorax": ("side",),
               "consolidation": ("side", "lobe", "dx", "dy", "patchy"), "nodule": ("side", "zone", "dx", "dy")}


def level_of(f: str, d: dict) -> int:
    """The severity level (index into _LEVELS[f]) of a finding's details."""
    if f == "cardiomegaly":
        return {"mild": 0, "moderate": 1, "marked": 2}[d["severity"]]
    if f in ("pleural_effusion", "pneumothorax"):
        return {"small": 0, "moderate": 1, "large": 2}[d["size"]]
    if f == "consolidation":
        return int(d.get("level", 0 if d["alpha"] < 1.0 else 1))
    return [w for w, _ in _NODULE_SIZES].index(d["size"])


def _set_level(f: str, d: dict, level: int, jitter: float) -> None:
    """Give a finding's details the size of `level` (drawn fully, never subtle)."""
    word, v = _LEVELS[f][level]
    if f == "cardiomegaly":
        d.update(severity=word, ctr=float(v + 0.02 * jitter))
    elif f == "pleural_effusion":
        d.update(size=word, height=float(v + 0.03 * jitter), alpha=1.0)
    elif f == "pneumothorax":
        d.update(size=word, scale=float(v + 0.03 * jitter), alpha=1.0)
    elif f == "consolidation":
        d.update(level=level, size=word, rx=float(v + 0.01 * jitter), ry=float(0.93 * v + 0.01 * jitter), alpha=1.0)
    else:
        d.update(size=word, radius=v, alpha=1.0)


def evolve_labels(prior_labels: dict, prior_details: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """The next study's (labels, change) from the prior's: change maps every finding present in either study
    to new | worse | better | unchanged | resolved (a finding at its largest size cannot grow, at its smallest
    it cannot shrink: it stays or resolves)."""
    labels, change = {}, {}
    for f in FINDINGS:
        if prior_labels[f]:
            p = dict(_P_TRANSITION)
            p["resolved"] = _P_RESOLVE.get(f, p["resolved"])
            keys = list(p)
            w = np.array([p[k] for k in keys])
            c = keys[int(rng.choice(len(keys), p=w / w.sum()))]
            lvl = level_of(f, prior_details[f])
            if c == "worse" and lvl == len(_LEVELS[f]) - 1:
                c = "unchanged"
            if c == "better" and lvl == 0:
                c = "resolved"
            change[f] = c
            labels[f] = int(c != "resolved")
        else:
            labels[f] = int(rng.random() < _P_NEW[f])
            if labels[f]:
                change[f] = "new"
    return labels, change


def evolve_details(details: dict, prior_details: dict, change: dict, rng: np.random.Generator) -> dict:
    """Details of a later study: persisting findings keep their place and take their new size; new ones get
    a small or moderate size at the place freshly drawn in `details`."""
    d = {f: dict(v) for f, v in details.items()}
    u = rng.random(2 * len(FINDINGS))
    for i, f in enumerate(FINDINGS):
        c = change.get(f)
        if c is None:
            continue
        if c == "resolved":  # absent now (not drawn), but the report names it where it was
            for k in _PLACE_KEYS[f]:
                d[f][k] = prior_details[f][k]
            continue
        if c == "new":
            _set_level(f, d[f], int(u[2 * i] < 0.4), u[2 * i + 1])
            continue
        for k in _PLACE_KEYS[f]:
            d[f][k] = prior_details[f][k]
        lvl = level_of(f, prior_details[f]) + {"worse": 1, "better": -1}.get(c, 0)
        _set_level(f, d[f], lvl, u[2 * i + 1])
    return d


# ---------------------------------------------------------------------------------------------------------
# Rendering (vectorised numpy; all geometry in normalised anatomical coordinates, so any image size works)
# ---------------------------------------------------------------------------------------------------------
_BG, _BODY, _LUNG, _MEDIAST, _HEART, _FLUID, _PTX, _BONE = 10.0, 122.0, 60.0, 150.0, 162.0, 145.0, 6.0, 175.0


def _smooth_noise(rng, size, k):
    g = rng.standard_normal((k, k)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _ellipse(u, v, cx, cy, ax, ay, aa, p_lower=2.0):
    """Soft (anti-aliased) mask of an ellipse; p_lower > 2 squares off its lower half (costophrenic angles)."""
    dx = np.abs(u - cx) / ax
    dy = (v - cy) / ay
    if p_lower == 2.0:
        r = np.sqrt(dx * dx + dy * dy)
    else:
        ady = np.abs(dy)
        r = np.where(dy > 0, (dx ** p_lower + ady ** p_lower) ** (1.0 / p_lower), np.sqrt(dx * dx + dy * dy))
    return np.clip(0.5 + (1.0 - r) * min(ax, ay) / aa, 0.0, 1.0), r


def _finish(img, rng_vals, noise, size):
    """Global contrast/brightness/gamma jitter, gaussian noise, 8-bit."""
    c, b, g, sigma = rng_vals
    img = (img - 110.0) * c + 110.0 + b
    img = 255.0 * (np.clip(img, 0.0, 255.0) / 255.0) ** g
    img = img + sigma * noise
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def render_study(labels: dict, rng: np.random.Generator, image_size: int = 64, subtle=(), details=None):
    """Render (frontal PA, lateral) 8-bit grayscale PIL images of one study.

    The number of random draws does not depend on ``labels``, so the same generator state rendered with and
    without a finding differs only where that finding is drawn. ``details`` (from ``sample_details``) fixes
    severity/side/location; drawn from ``rng`` when not given.
    """
    S = int(image_size)
    if details is None:
        details = sample_details(labels, subtle, rng)
    has = {f: bool(labels.get(f)) for f in FINDINGS}

    # --- random draws, fixed in number and order ---
    g = rng.random(16)
    tex = [_smooth_noise(rng, S, max(4, S // 6)), _smooth_noise(rng, S, max(6, S // 3)),
           _smooth_noise(rng, S, max(4, S // 8)), _smooth_noise(rng, S, max(4, S // 6))]
    noise_f = rng.standard_normal((S, S)).astype(np.float32)
    noise_l = rng.standard_normal((S, S)).astype(np.float32)

    s = 0.92 + 0.12 * g[0]                 # patient size
    wx = 0.95 + 0.10 * g[1]                # chest width
    tx, ty = 0.06 * (g[2] - 0.5), 0.06 * (g[3] - 0.5)
    th = np.deg2rad(6.0 * (g[4] - 0.5))
    glob_f = (0.85 + 0.3 * g[5], 24.0 * (g[6] - 0.5), 0.9 + 0.2 * g[7], 2.0 + 2.0 * g[8])
    glob_l = (0.85 + 0.3 * g[9], 24.0 * (g[10] - 0.5), 0.9 + 0.2 * g[7], 2.0 + 2.0 * g[8])
    rib_phase = 6.283 * g[11]

    px = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = np.meshgrid(px, px)
    X0, Y0 = X - 0.5 - tx, Y - 0.5 - ty
    U = 0.5 + (np.cos(th) * X0 + np.sin(th) * Y0) / (s * wx)
    V = 0.5 + (-np.sin(th) * X0 + np.cos(th) * Y0) / s
    aa = 1.0 / (S * s)

    frontal = _render_frontal(U, V, aa, has, details, tex, rib_phase)
    lateral = _render_lateral(U, V, aa, has, details, tex)
    return _finish(frontal, glob_f, noise_f, S), _finish(lateral, glob_l, noise_l, S)


# lung geometry (frontal), in anatomical coordinates; "right" lung is on the image's left
_LUNG_DX, _LUNG_CY, _LUNG_AX, _LUNG_AY = 0.19, 0.45, 0.15, 0.30


def _lung_center(side):
    return (0.5 - _LUNG_DX if side == "right" else 0.5 + _LUNG_DX), _LUNG_CY


def _lateral_dir(side):  # +1 when moving laterally increases u
    return -1.0 if side == "right" else 1.0


def _render_frontal(U, V, aa, has, d, tex, rib_phase):
    img = np.full(U.shape, _BG, np.float32)
    body, _ = _ellipse(U, V, 0.5, 0.63, 0.46, 0.62, aa)
    img += body * (_BODY - _BG)
    # clavicles: faint bright oblique bands at the top
    for side in ("right", "left"):
        sd = _lateral_dir(side)
        cl = np.exp(-((V - 0.13 - 0.10 * np.abs(U - 0.5)) / 0.012) ** 2) * (np.abs(U - 0.5) < 0.30) * body
        img += 18.0 * cl * ((U - 0.5) * sd > 0)

    lungs = {}
    lung_any = np.zeros(U.shape, np.float32)
    markings = 5.0 * tex[0] + 3.0 * tex[1]
    ribs = 3.0 * np.sin(6.283 * 8.0 * (V + 0.25 * (U - 0.5) ** 2) + rib_phase)
    for side in ("right", "left"):
        cx, cy = _lung_center(side)
        ay = _LUNG_AY * (1.0 if side == "right" else 0.97)
        m, _ = _ellipse(U, V, cx, cy, _LUNG_AX, ay, aa, p_lower=3.5)
        lungs[side] = m
        lung_any = np.maximum(lung_any, m)
    hil = np.exp(-np.minimum(np.hypot(U - 0.5 + 0.07, V - 0.5), np.hypot(U - 0.5 - 0.07, V - 0.5)) / 0.09)
    lung_val = _LUNG + markings + ribs + 22.0 * hil
    img = img * (1 - lung_any) + lung_val * lung_any

    # pneumothorax: lung collapsed towards the hilum; dark rim with no markings and a visible pleural line
    p = d["pneumothorax"]
    if has["pneumothorax"]:
        side, f = p["side"], p["scale"]
        cx, cy = _lung_center(side)
        sd = _lateral_dir(side)
        ancx, ancy = cx - sd * _LUNG_AX * 0.8, cy + 0.8 * _LUNG_AY  # anchor: medial base -> apical/lateral rim
        ccx, ccy = ancx + (cx - ancx) * f, ancy + (cy - ancy) * f
        coll, rc = _ellipse(U, V, ccx, ccy, _LUNG_AX * f, _LUNG_AY * f, aa, p_lower=3.5)
        rim = lungs[side] * (1 - coll)
        a = p["alpha"]
        img = img * (1 - a * rim) + _PTX * a * rim
        line = np.exp(-(((rc - 1.0) * _LUNG_AX * f) / (1.2 * aa)) ** 2) * lungs[side]
        img += 50.0 * a * line

    # mediastinum and heart
    med, _ = _ellipse(U, V, 0.5, 0.30, 0.055, 0.34, aa)
    img = img * (1 - med) + (_MEDIAST + 4.0 * tex[2]) * med
    ctr = d["cardiomegaly"]["ctr"]
    thorax_w = 2.0 * (_LUNG_DX + _LUNG_AX)
    hax = 0.5 * ctr * thorax_w
    heart, _ = _ellipse(U, V, 0.5 + 0.03 + 0.25 * (hax - 0.14), 0.635, hax, 0.155, aa)
    img = img * (1 - heart) + (_HEART + 3.0 * tex[2]) * heart

    # pleural effusion: basal opacity with a meniscus rising laterally (blunted costophrenic angle)
    e = d["pleural_effusion"]
    if has["pleural_effusion"]:
        sides = ("right", "left") if e["side"] == "bilateral" else (e["side"],)
        for side in sides:
            cx, cy = _lung_center(side)
            sd = _lateral_dir(side)
            t = np.clip(((U - cx) * sd + _LUNG_AX) / (2 * _LUNG_AX), 0.0, 1.0)  # 0 medial .. 1 lateral
            level = cy + _LUNG_AY - e["height"] * (0.55 + 0.6 * t ** 2)
            fl = np.clip(0.5 + (V - level) / (1.5 * aa), 0.0, 1.0) * lungs[side]
            a = e["alpha"] * fl
            img = img * (1 - a) + (_FLUID + 3.0 * tex[3]) * a

    # consolidation: irregular bright lobar patch, keeping some texture (air bronchograms)
    c = d["consolidation"]
    if has["consolidation"]:
        cx, cy = _lung_center(c["side"])
        sd = _lateral_dir(c["side"])
        ccx, ccy = cx + sd * c["dx"] * _LUNG_AX, cy + c["dy"] * _LUNG_AY
        r = np.hypot((U - ccx) / c["rx"], (V - ccy) / c["ry"]) + (0.35 if c["patchy"] else 0.2) * tex[1]
        m = np.clip(0.5 + (1.0 - r) * min(c["rx"], c["ry"]) / (1.5 * aa), 0.0, 1.0) * lungs[c["side"]]
        img += 120.0 * c["alpha"] * m

    # nodule: small round opacity
    n = d["nodule"]
    if has["nodule"]:
        cx, cy = _lung_center(n["side"])
        sd = _lateral_dir(n["side"])
        ncx, ncy = cx + sd * n["dx"] * _LUNG_AX, cy + n["dy"] * _LUNG_AY
        m, _ = _ellipse(U, V, ncx, ncy, n["radius"], n["radius"], aa * 0.8)
        img += 140.0 * n["alpha"] * m
    return img


def _render_lateral(U, V, aa, has, d, tex):
    img = np.full(U.shape, _BG, np.float32)
    body, _ = _ellipse(U, V, 0.5, 0.62, 0.40, 0.62, aa)
    img += body * (_BODY - _BG)
    lung, _ = _ellipse(U, V, 0.50, 0.46, 0.27, 0.30, aa, p_lower=3.0)
    img = img * (1 - lung) + (_LUNG + 12.0 + 6.0 * tex[0] + 3.0 * tex[1]) * lung
    # spine (posterior, image right) with vertebral segments; sternum anterior
    sp = np.clip(0.5 + (0.04 - np.abs(U - 0.84)) / aa, 0.0, 1.0) * body
    img = img * (1 - sp) + (_BONE + 10.0 * np.sin(6.283 * 11.0 * V)) * sp
    st = np.clip(0.5 + (0.012 - np.abs(U - 0.16 - 0.05 * V)) / aa, 0.0, 1.0) * (V > 0.2) * (V < 0.75)
    img += 25.0 * st
    # heart: anterior-inferior, grows posteriorly with cardiomegaly
    ctr = d["cardiomegaly"]["ctr"]
    hax = 0.30 * ctr
    heart, _ = _ellipse(U, V, 0.25 + 0.8 * hax, 0.66, hax, 0.15, aa)
    img = img * (1 - heart) + (_HEART - 5.0 + 3.0 * tex[2]) * heart
    e = d["pleural_effusion"]
    if has["pleural_effusion"]:
        h = e["height"] * (1.25 if e["side"] == "bilateral" else 1.0)
        t = np.clip((U - 0.23) / 0.54, 0.0, 1.0)  # 0 anterior .. 1 posterior
        level = 0.46 + 0.30 - h * (0.5 + 0.7 * t ** 2)
        fl = np.clip(0.5 + (V - level) / (1.5 * aa), 0.0, 1.0) * lung
        a = e["alpha"] * fl
        img = img * (1 - a) + (_FLUID + 3.0 * tex[3]) * a
    c = d["consolidation"]
    if has["consolidation"]:  # faint on the lateral view
        ccx, ccy = 0.5 + 0.12 * c["dx"], 0.46 + c["dy"] * 0.3
        r = np.hypot((U - ccx) / (1.3 * c["rx"]), (V - ccy) / c["ry"]) + 0.25 * tex[1]
        m = np.clip(0.5 + (1.0 - r) * c["ry"] / (1.5 * aa), 0.0, 1.0) * lung
        img += 25.0 * c["alpha"] * m
    return img


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _positive_sentence(f, d, rng) -> str:
    if f == "cardiomegaly":
        sev = d["severity"]
        adv = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[sev]
        return _pick(rng, (
            f"The heart is {adv} enlarged.",
            f"There is {sev} cardiomegaly.",
            f"{_cap(sev)} cardiomegaly.",
            "The cardiac silhouette is enlarged.",
            "The heart is enlarged.",
        ))
    if f == "pleural_effusion":
        size, side = d["size"], d["side"]
        if side == "bilateral":
            return _pick(rng, (
                f"There are {size} bilateral pleural effusions.",
                f"{_cap(size)} bilateral pleural effusions.",
                f"{_cap(size)} bilateral pleural effusions are present.",
                f"Blunting of both costophrenic angles consistent with {size} pleural effusions.",
            ))
        return _pick(rng, (
            f"There is a {size} {side} pleural effusion.",
            f"{_cap(size)} {side} pleural effusion.",
            f"A {size} {side} pleural effusion is present.",
            f"Blunting of the {side} costophrenic angle consistent with a {size} pleural effusion.",
        ))
    if f == "pneumothorax":
        size, side = d["size"], d["side"]
        return _pick(rng, (
            f"There is a {size} {side} pneumothorax.",
            f"A {size} {side} apical pneumothorax is present.",
            f"{_cap(size)} {side} pneumothorax.",
            f"A {side} pleural line is seen with a {size} pneumothorax.",
        ))
    if f == "consolidation":
        side, lobe = d["side"], d["lobe"]
        adj = "patchy" if d["patchy"] else "focal"
        return _pick(rng, (
            f"{_cap(adj)} consolidation in the {side} {lobe} lobe.",
            f"There is {side} {lobe} lobe consolidation.",
            f"{_cap(adj)} airspace opacity in the {side} {lobe} lobe, concerning for pneumonia.",
            f"Consolidation is seen in the {side} {lobe} lobe.",
        ))
    if f == "nodule":
        size, side, zone = d["size"], d["side"], d["zone"]
        art = "An" if size.startswith("8") else "A"
        return _pick(rng, (
            f"{art} {size} nodule projects over the {side} {zone} lung.",
            f"There is {art.lower()} {size} nodule in the {side} {zone} lung.",
            f"{art} {size} nodular opacity is seen in the {side} {zone} lung.",
        ))
    raise KeyError(f)


def _place(f: str, d: dict) -> str:
    """The finding named by where it is, without its size ("left pleural effusion")."""
    if f == "cardiomegaly":
        return "cardiomegaly"
    if f == "pleural_effusion":
        return "bilateral pleural effusions" if d["side"] == "bilateral" else f"{d['side']} pleural effusion"
    if f == "pneumothorax":
        return f"{d['side']} pneumothorax"
    if f == "consolidation":
        return f"{d['side']} {d['lobe']} lobe consolidation"
    return f"{d['side']} {d['zone']} lung nodule"


def _size_word(f: str, d: dict) -> str | None:
    if f == "cardiomegaly":
        return d["severity"]
    if f == "consolidation":
        return None  # its size is drawn, not written: a change in it is read from the prior's images
    return d["size"]


# The change-phrase bank: {p} the finding by place, {s} its size now, {np} size + place.
_CHANGE_PHRASES = {
    "unchanged": ("Stable {np}.", "Unchanged {np}.", "The {np} is unchanged.", "{NP} is again seen, unchanged."),
    "worse": ("Increased {p}{now}.", "The {p} has increased{now}.", "Interval increase in the {p}{now}.",
              "Worsening {p}{now}."),
    "better": ("Decreased {p}{now}.", "The {p} has decreased{now}.", "Interval decrease in the {p}{now}.",
               "Improving {p}{now}."),
    "resolved": ("Interval resolution of the {p}.", "The previously seen {p} has resolved.", "Resolved {p}."),
    "new": ("New {np}.", "There is a new {np}.", "Interval development of a {np}."),
}


def _change_sentence(f: str, d: dict, change: str, rng) -> str:
    place, size = _place(f, d), _size_word(f, d)
    if f == "cardiomegaly" and change in ("worse", "better"):
        place = "cardiac enlargement"
    np_ = f"{size} {place}" if size else place
    if f == "cardiomegaly" and change == "new":
        np_ = f"{size} cardiac enlargement"
    now = f", now {size}" if size else ""
    text = _pick(rng, _CHANGE_PHRASES[change]).format(p=place, s=size, np=np_, NP=_cap(np_), now=now)
    return text.replace(" a 8 mm", " an 8 mm")


_NEGATIVE = {
    "cardiomegaly": ("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly.",
                     "The cardiac silhouette is within normal limits."),
    "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusions."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "consolidation": ("No focal consolidation.", "There is no focal consolidation.", "No focal airspace opacity."),
    "nodule": ("No pulmonary nodules.", "No suspicious pulmonary nodule."),
}
_LUNG_FINDINGS = ("pleural_effusion", "pneumothorax", "consolidation", "nodule")
_FILLERS = {
    "mediastinum": ("The mediastinal contours are normal.", "The mediastinal and hilar contours are unremarkable."),
    "bones": ("No acute osseous abnormality.", "The osseous structures are unremarkable."),
}
# canonical order of report sections
_ORDER = ("cardiomegaly", "mediastinum", "consolidation", "nodule", "clear", "pleural_effusion",
          "pneumothorax", "combined", "bones")


_IMPRESSION_PREFIX = {"unchanged": "stable ", "worse": "increased ", "better": "decreased ", "new": "new "}


def _impression(labels, d, rng, change=None) -> str:
    if change:
        parts = [_IMPRESSION_PREFIX[change[f]] + (f"{_size_word(f, d[f])} " if _size_word(f, d[f]) and
                                                  change[f] in ("unchanged", "new") else "") + _place(f, d[f])
                 for f in FINDINGS if labels[f] and f in change]
        parts += [f"resolved {_place(f, d[f])}" for f in FINDINGS if change.get(f) == "resolved"]
        if not parts:
            return _pick(rng, ("No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process."))
        return _cap(", ".join(parts)) + "."
    parts = []
    if labels["cardiomegaly"]:
        parts.append("cardiomegaly")
    if labels["pleural_effusion"]:
        e = d["pleural_effusion"]
        parts.append(f"{e['size']} bilateral pleural effusions" if e["side"] == "bilateral"
                     else f"{e['size']} {e['side']} pleural effusion")
    if labels["pneumothorax"]:
        p = d["pneumothorax"]
        parts.append(f"{p['size']} {p['side']} pneumothorax")
    if labels["consolidation"]:
        c = d["consolidation"]
        parts.append(f"{c['side']} {c['lobe']} lobe " + _pick(rng, ("consolidation", "pneumonia")))
    if labels["nodule"]:
        n = d["nodule"]
        parts.append(f"{n['size']} {n['side']} {n['zone']} lung nodule")
    if not parts:
        return _pick(rng, ("No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                           "Normal chest radiograph."))
    if len(parts) == 1:
        text = parts[0]
    elif len(parts) == 2:
        text = f"{parts[0]} and {parts[1]}"
    else:
        text = ", ".join(parts[:-1]) + ", and " + parts[-1]
    return _cap(text) + "."


def compose_report(labels: dict, details: dict, rng: np.random.Generator,
                   change: dict | None = None) -> tuple[str, str]:
    """Return (findings text, impression) describing exactly the given labels/details.

    change (a later study of a patient: finding -> new | worse | better | unchanged | resolved): those findings
    are described against the prior from the change-phrase bank; without it no sentence mentions a comparison.
    """
    change = change or {}
    sec: dict[str, str] = {}
    for f in FINDINGS:
        if f in change:
            sec[f] = _change_sentence(f, details[f], change[f], rng)
        elif labels[f]:
            sec[f] = _positive_sentence(f, details[f], rng)
        elif rng.random() < 0.5:
            sec[f] = _pick(rng, _NEGATIVE[f])
    no_lung = not any(labels[f] for f in _LUNG_FINDINGS)
    if no_lung and rng.random() < 0.7:
        sec["clear"] = _pick(rng, ("The lungs are clear.", "The lungs are clear bilaterally."))
    # occasionally combined negations replace the single ones
    if not labels["pleural_effusion"] and not labels["pneumothorax"] and rng.random() < 0.3 \
            and "pleural_effusion" not in change and "pneumothorax" not in change:
        sec.pop("pleural_effusion", None)
        sec.pop("pneumothorax", None)
        if not labels["consolidation"] and "consolidation" not in change and rng.random() < 0.4:
            sec.pop("consolidation", None)
            sec["combined"] = "No focal consolidation, pleural effusion, or pneumothorax."
        else:
            sec["combined"] = _pick(rng, ("No pleural effusion or pneumothorax.",
                                          "There is no pleural effusion or pneumothorax."))
    for k, opts in _FILLERS.items():
        if rng.random() < 0.35:
            sec[k] = _pick(rng, opts)

    def n_words():
        return sum(len(t.split()) for t in sec.values())

    # keep reports within ~15-50 words: pad with negatives/fillers, trim optional sentences
    pad = [f for f in FINDINGS if not labels[f]] + list(_FILLERS)
    rng.shuffle(pad)
    for k in pad:
        if n_words() >= 15:
            break
        if k in sec or (k in ("pleural_effusion", "pneumothorax", "consolidation") and "combined" in sec):
            continue
        sec[k] = _pick(rng, _FILLERS[k]) if k in _FILLERS else _pick(rng, _NEGATIVE[k])
    for k in ("bones", "mediastinum", "clear", "combined") + FINDINGS:
        if n_words() <= 50:
            break
        if k in sec and not (k in FINDINGS and (labels[k] or k in change)):
            del sec[k]

    keys = [k for k in _ORDER if k in sec]
    if rng.random() < 0.35:
        keys = [keys[i] for i in rng.permutation(len(keys))]
    return " ".join(sec[k] for k in keys), _impression(labels, details, rng, change)


# ---------------------------------------------------------------------------------------------------------
# Labeler
# ---------------------------------------------------------------------------------------------------------
_FINDING_PATTERNS = {
    "cardiomegaly": re.compile(
        r"\bcardiomegaly\b|\b(?:heart|cardiac silhouette|cardiac)\b[^.;]*?\benlarg\w*|\benlarged (?:heart|cardiac)"),
    "pleural_effusion": re.compile(r"\beffusions?\b|\bblunting of (?:the|both)\b[^.;]*?\bcostophrenic"),
    "pneumothorax": re.compile(r"\bpneumothora(?:x|ces)\b"),
    "consolidation": re.compile(r"\bconsolidat\w*|\bairspace (?:opacit\w*|disease)|\bpneumonia\b"),
    "nodule": re.compile(r"\bnodul\w*|\bmass(?:es)?\b"),
}
_NEGATION = re.compile(r"\bno\b|\bnot\b|\bwithout\b|\bnegative for\b|\bfree of\b|\bresolved\b|\bn't\b")
# "The previously seen left pleural effusion has resolved.", "Interval resolution of ...": gone, wherever the cue is
_RESOLUTION = re.compile(r"\bresol(?:ved|ution)\b|\bno longer\b")
_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+|;\s*|,?\s+\bbut\b\s+|,?\s+\bhowever\b,?\s+")


def label_report(text: str) -> dict[str, int]:
    """Read the five findings from report text: 1 where some sentence affirms the finding un-negated.

    Sentence (and clause: ';', 'but', 'however') level; a mention is negated when a negation cue ('no',
    'not', 'without', ...) appears before it in its clause ("No pleural effusion or pneumothorax.",
    "The heart is not enlarged."). "Heart size is normal." mentions no finding.
    """
    out = {f: 0 for f in FINDINGS}
    if not text:
        return out
    for sent in _SPLIT.split(text.lower()):
        if not sent or not sent.strip():
            continue
        if _RESOLUTION.search(sent):
            continue
        cues = [m.start() for m in _NEGATION.finditer(sent)]
        for f, pat in _FINDING_PATTERNS.items():
            if out[f]:
                continue
            for m in pat.finditer(sent):
                if not any(c < m.end() for c in cues):
                    out[f] = 1
                    break
    return out


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------
def _assign_splits(patients: list[str], counts: dict[str, int], rng) -> dict[str, str]:
    order = [patients[i] for i in rng.permutation(len(patients))]
    total = sum(counts.values())
    split_of, cum = {}, 0
    for p in order:
        frac = cum / max(total, 1)
        split_of[p] = "train" if frac < 0.8 else ("val" if frac < 0.9 else "test")
        cum += counts[p]
    if len(order) >= 3:  # every split non-empty even for tiny n
        present = set(split_of.values())
        if "test" not in present:
            split_of[order[-1]] = "test"
        if "val" not in set(split_of.values()):
            split_of[order[-2]] = "val"
    return split_of


def write_synthetic_dataset(out_dir, n: int = 2000, seed: int = 0, image_size: int = 64) -> Path:
    """Write n studies (PNG images + manifest.jsonl) under out_dir; deterministic given seed. Returns the manifest."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])

    # patients: about a third with one study, the others with 2-4 studies over time
    study_patient: list[str] = []
    pcount: dict[str, int] = {}
    while len(study_patient) < n:
        pid = f"synth-p{len(pcount):05d}"
        k = 1 if rng.random() < P_SINGLE_STUDY else int(rng.integers(2, 5))
        k = min(k, n - len(study_patient))
        pcount[pid] = k
        study_patient += [pid] * k
    split_of = _assign_splits(list(pcount), pcount, np.random.default_rng([seed, 1]))
    evolve_rng = np.random.default_rng([seed, 3])  # the course of findings over time (apart: same images)
    base_day = np.datetime64("2015-01-01")

    records, last = [], {}  # last: patient -> (id, labels, details, date) of their previous study
    for i, pid in enumerate(study_patient):
        sid = f"synth-{i:05d}"
        prior = last.get(pid)
        img_rng = np.random.default_rng([seed, 2, i])
        if prior is None:
            labels = sample_labels(rng)
            change = {}
            subtle = _sample_subtle(labels, rng)
            details = sample_details(labels, subtle, img_rng)
            day = base_day + int(evolve_rng.integers(0, 1800))
        else:
            labels, change = evolve_labels(prior[1], prior[2], evolve_rng)
            subtle = []
            details = evolve_details(sample_details(labels, subtle, img_rng), prior[2], change, evolve_rng)
            day = prior[3] + int(evolve_rng.integers(14, 400))
        last[pid] = (sid, labels, details, day)
        frontal, lateral = render_study(labels, img_rng, image_size, subtle, details=details)

        indication, kind, _ = _indication(labels, subtle, details, rng)
        history = _history(labels, rng)
        if prior is None:  # the free-text comparison line never claims a prior the patient does not have
            comparison = "None." if rng.random() < 0.4 else None
        else:
            comparison = None  # the prior itself (prior_id) is the comparison
        findings, impression = compose_report(labels, details, rng, change)

        images = [{"path": f"images/{sid}_frontal.png", "view": "PA"}]
        frontal.save(out_dir / images[0]["path"], compress_level=1)
        if rng.random() >= P_MISSING_LATERAL:
            images.append({"path": f"images/{sid}_lateral.png", "view": "LATERAL"})
            lateral.save(out_dir / images[1]["path"], compress_level=1)
        rec = {
            "id": sid, "patient_id": pid, "split": split_of[pid], "images": images,
            "indication": indication, "history": history, "comparison": comparison,
            "findings": findings, "impression": impression,
            "dataset": "synthetic", "labels": dict(labels), "subtle": list(subtle), "indication_type": kind,
            "study_date": str(day),
        }
        if prior is not None:
            rec.update(prior_id=prior[0], interval_days=int((day - prior[3]).astype(int)), change=change)
        records.append(rec)
    manifest = out_dir / "manifest.jsonl"
    write_manifest(records, manifest)
    return manifest
