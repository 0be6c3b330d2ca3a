"""The case viewer: one self-contained, offline HTML page per predictions file (``eval --html``, ``view``).

The page needs no server, no network and no other file: CSS, JavaScript and data are inline, and every view of
every study is embedded as a downsized JPEG data URI (``--thumb-size`` pixels on the long side, default 160;
DICOM rendered through ``clinicalblip.data.images.load_image``, i.e. the same Modality LUT / VOI / MONOCHROME1
pipeline the model sees). A radiologist can open it from a USB stick. About 4 KB per view: a MIMIC-size test split
(3,800 studies, ~2 views) gives a ~35 MB page.

Layout: a summary (metrics with 95 % CIs, protocol, labeler and convention, per-label P/R/F1 chart, and the input
ablation rows when ``eval.sh`` left them beside the metrics), then the case browser: one row per study with its
thumbnails, indication / history / comparison, reference and generated text side by side, the labeler's findings
as badges (agree / false positive / false negative / uncertain) and per-study scores. Filters (label x error type,
minimum disagreements, text search), sorting and pagination run in the browser on the embedded array, so 3,800
rows filter instantly and only one page (25-200 rows) is in the DOM. ``#case=ID`` in the URL opens one study
(the compare page links in this way).
"""

from __future__ import annotations

import base64
import html as _html
import io
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

from clinicalblip.progress import progress

from clinicalblip.errors import UserError
from clinicalblip.metrics.clinical import binarize
from clinicalblip.metrics.nlg import METRIC_KEYS

log = logging.getLogger(__name__)

CONTEXT_FIELDS = ("indication", "history", "comparison")


# ---------------------------------------------------------------------------------------------- data
def thumbnail_data_uri(path: str | Path, size: int = 160, quality: int = 70) -> str:
    """A grayscale JPEG data URI of the image at ``path`` (PNG/JPEG/DICOM via the project's loader), long side
    ``size`` pixels."""
    from clinicalblip.data.images import load_image

    im = load_image(path).convert("L")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _manifest_index(manifest: str | Path | None, provenance: Mapping | None) -> tuple[dict[str, dict], str | None]:
    from clinicalblip.data.manifest import read_manifest

    src = manifest
    if src is None and isinstance(provenance, Mapping) and provenance.get("manifest"):
        src = provenance["manifest"]
        if not Path(src).is_file():
            log.warning("the manifest named in the provenance (%s) is not here: no images or context", src)
            return {}, None
    if src is None:
        return {}, None
    if not Path(src).is_file():
        raise UserError(f"manifest not found: {src}")
    return {str(r["id"]): r for r in read_manifest(src, resolve_paths=True)}, str(src)


def _badges(ref: Mapping, pred: Mapping, observations: Sequence[str], uncertain_as: str) -> list[list]:
    """[label index, status (agree | fp | fn | neg), uncertain 0/1] for every label that is positive or
    uncertain on either side (status by the same binarisation as the metrics)."""
    out = []
    for j, o in enumerate(observations):
        r, p = ref.get(o), pred.get(o)
        rb, pb = binarize(r, uncertain_as), binarize(p, uncertain_as)
        unc = int(r == -1 or p == -1)
        status = "agree" if rb and pb else "fp" if pb else "fn" if rb else "neg"
        if status != "neg" or unc:
            out.append([j, status, unc])
    return out


def _neural_case(neural: Mapping, i: int) -> dict:
    """Per-case RadGraph F1 (RG_ER, the "partial" reward) and CheXbert's label disagreements for case ``i``."""
    out: dict = {}
    if "radgraph_partial" in neural:
        out["rg"] = round(neural["radgraph_partial"][i], 4)
    if "chexbert_labels" in neural:
        from clinicalblip.metrics.conventions import disagreements

        lab = neural["chexbert_labels"]
        out["cxb"] = [[d["observation"], d["reference"], d["prediction"]]
                      for d in disagreements(lab["reference"][i], lab["prediction"][i])]
    return out


def _ablation_rows(folder: Path) -> list[dict]:
    """eval.sh's ablations (metrics_<mode>.json) and, when compare.json is there, their paired tests vs real."""
    from clinicalblip.demo import ABLATIONS

    comp: dict[str, dict] = {}
    cfile = folder / "compare.json"
    if cfile.is_file():
        try:
            for c in json.loads(cfile.read_text(encoding="utf-8")).get("comparisons", []):
                comp[c["b"]] = c["metrics"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", cfile)
    rows = []
    for mode, label in ABLATIONS:
        f = folder / f"metrics_{mode}.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text(encoding="utf-8"))
        row = {"mode": mode, "label": label, "values": {k: m.get(k) for k in (*METRIC_KEYS, "clinical_macro_f1")}}
        if mode in comp:
            row["tests"] = {k: {kk: v.get(kk) for kk in ("diff", "ci95", "p", "p_holm", "significant")}
                            for k, v in comp[mode].items() if k in (*METRIC_KEYS, "clinical_macro_f1")}
        rows.append(row)
    return rows if len(rows) > 1 else []


def viewer_data(records: Sequence[dict], metrics: Mapping, cases: Mapping, *, manifest: str | Path | None = None,
                thumbnails: bool = True, thumb_size: int = 160, ablations: Sequence[dict] = ()) -> dict:
    """The JSON the page embeds: summary, per-label chart data, ablations, observations and one entry per case."""
    index, manifest_used = _manifest_index(manifest, metrics.get("provenance"))
    labels = cases["labels"]
    obs = labels["observations"]
    uncertain_as = metrics["clinical"].get("uncertain_as") or "positive"
    nlg = cases["nlg"]
    thumbs: list[str] = []
    missing = 0
    out_cases = []
    for i, rec in enumerate(progress(records, desc="viewer", unit="study", disable=len(records) < 200)):
        rid = cases["ids"][i]
        m = index.get(rid, {})
        views = []
        for img in m.get("images") or []:
            uri_at = None
            if thumbnails:
                try:
                    thumbs.append(thumbnail_data_uri(img["path"], thumb_size))
                    uri_at = len(thumbs) - 1
                except UserError as exc:
                    missing += 1
                    log.debug("no thumbnail: %s", exc)
            views.append([uri_at, img.get("view") or ""])
        badges = _badges(labels["reference"][i], labels["prediction"][i], obs, uncertain_as)
        scores = {"dis": sum(1 for b in badges if b[1] in ("fp", "fn"))}
        if "rouge_l" in nlg:
            scores["rouge"] = round(nlg["rouge_l"][i], 4)
        if "cider" in nlg:
            scores["cider"] = round(nlg["cider"][i], 4)
        scores.update(_neural_case(cases.get("neural") or {}, i))
        out_cases.append({
            "id": rid, "views": views,
            "ctx": [(m.get(k) if m else rec.get(k)) or "" for k in CONTEXT_FIELDS],
            "ref": rec.get("reference") or "", "pred": rec.get("prediction") or "",
            "badges": badges, "s": scores,
        })
        if cases.get("change") is not None:  # the prior study: change labels, temporal F1, invented comparison
            ch = cases["change"]
            out_cases[-1]["chg"] = {"prior": bool(ch["has_prior"][i]), "t": round(float(ch["temporal"][i]), 4),
                                    "inv": bool(ch["invented"][i]), "ref": ch["reference"][i],
                                    "pred": ch["prediction"][i]}
    if missing:
        log.warning("%d images could not be rendered (shown as missing)", missing)
    c = metrics["clinical"]
    rows = []
    for k in METRIC_KEYS:
        rows.append({"name": k, "value": metrics.get(k), "ci": (metrics.get("nlg_ci95") or {}).get(k)})
    chg = metrics.get("change") or {}
    for k, title in (("temporal_f1", "temporal F1 (studies with a prior)"),
                     ("change_f1", "change F1 (studies with a prior)"),
                     ("invented_comparison_rate", "invented comparisons (studies without a prior)")):
        if k in chg:
            rows.append({"name": title, "value": chg[k], "ci": None})
    for key, title in (("macro", f"clinical macro F1 ({len(c['observations'])} labels)"),
                       ("micro_5", "clinical micro F1 (5 common)"), ("micro", "clinical micro F1 (all labels)"),
                       ("no_finding", "No Finding F1")):
        if key in c:
            rows.append({"name": title, "value": c[key]["f1"], "ci": c[key].get("f1_ci95")})
    if "neural" in metrics:
        from clinicalblip.metrics.neural_eval import NEURAL_SUMMARY_KEYS

        rows += [{"name": k, "value": metrics[k], "ci": None} for k in NEURAL_SUMMARY_KEYS
                 if isinstance(metrics.get(k), float)]
    per_label = [{"name": o, "p": b["precision"], "r": b["recall"], "f1": b["f1"], "ci": b.get("f1_ci95"),
                  "support": b["support"], "predicted": b["predicted"]} for o, b in c["per_label"].items()]
    return {
        "title": str(metrics.get("predictions") or "predictions"),
        "n": len(out_cases),
        "protocol": metrics.get("protocol"), "labeler": c.get("labeler"), "convention": c.get("convention"),
        "bootstrap": c.get("bootstrap"), "manifest": manifest_used, "provenance": _flat(metrics.get("provenance")),
        "rows": rows, "per_label": per_label, "ablations": list(ablations), "observations": obs,
        "has_rouge": "rouge_l" in nlg, "has_cider": "cider" in nlg,
        "parity_warning": ("parity not checked: " + ", ".join(metrics["parity_not_checked"])
                           if metrics.get("parity_not_checked") else ""),
        "cases": out_cases, "thumbs": thumbs,
    }


def _flat(prov) -> dict:
    if not isinstance(prov, Mapping):
        return {}
    out = {}
    for k, v in prov.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, Mapping):
            out[k] = ", ".join(f"{kk}={vv}" for kk, vv in v.items() if not isinstance(vv, (dict, list)))
    return out


def write_viewer(records: Sequence[dict], metrics: Mapping, cases: Mapping, out_html: str | Path, *,
                 manifest: str | Path | None = None, metrics_path: str | Path | None = None,
                 thumbnails: bool = True, thumb_size: int = 160) -> Path:
    """Write the viewer page for scored records (``evaluate_records``'s metrics and cases); returns its path."""
    out_html = Path(out_html)
    folder = Path(metrics_path).parent if metrics_path else out_html.parent
    data = viewer_data(records, metrics, cases, manifest=manifest, thumbnails=thumbnails, thumb_size=thumb_size,
                       ablations=_ablation_rows(folder))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(render_page(data), encoding="utf-8")
    return out_html


def view_predictions(pred_path: str | Path, out_html: str | Path, metrics_path: str | Path | None = None, *,
                     manifest: str | Path | None = None, protocol: str = "r2gen", labeler: str = "auto",
                     uncertain_as: str = "positive", skip_java_metrics: bool = False, bootstrap: int = 1000,
                     seed: int = 0, thumbnails: bool = True, thumb_size: int = 160,
                     metrics_dir: str | Path | None = None, neural: str | Sequence[str] | None = None) -> Path:
    """``clinicalblip view``: the page alone. With ``metrics_path`` the summary is that metrics.json (per-study
    scores and badges are recomputed, without METEOR, which is corpus-only here); without, the file is scored
    as ``eval`` would score it. ``neural`` with ``metrics_dir`` adds the per-case neural values (RadGraph F1,
    CheXbert disagreements) through ``evaluate_records``, the code path of ``eval --html``."""
    from clinicalblip.metrics.evaluate_predictions import evaluate_records, read_predictions

    records, provenance = read_predictions(pred_path)
    if metrics_path:
        saved = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
        lab = saved.get("clinical", {}).get("labeler", "")
        if "chexbert" in lab.lower():
            raise UserError(f"{metrics_path} was labelled with {lab}; `view --metrics` recomputes the badges with the "
                            "rule labeler only: use `clinicalblip eval --labeler chexbert ... --html` instead")
        which = labeler if labeler != "auto" else ("synthetic" if lab.startswith("synthetic") else "auto")
        _, cases = evaluate_records(records, saved.get("protocol", protocol), which, bootstrap=0, seed=seed,
                                    skip_java_metrics=True,
                                    uncertain_as=saved.get("clinical", {}).get("uncertain_as") or uncertain_as,
                                    metrics_dir=metrics_dir, neural=neural)
        if saved.get("n") != len(records):
            raise UserError(f"{metrics_path} scores {saved.get('n')} studies but {pred_path} has {len(records)}: "
                            "not the metrics of these predictions")
        metrics = saved
    else:
        metrics, cases = evaluate_records(records, protocol, labeler, bootstrap, seed,
                                          skip_java_metrics=skip_java_metrics, uncertain_as=uncertain_as,
                                          metrics_dir=metrics_dir, neural=neural)
        metrics["predictions"] = str(pred_path)
    if provenance is not None:
        metrics.setdefault("provenance", provenance)
    return write_viewer(records, metrics, cases, out_html, manifest=manifest, metrics_path=metrics_path,
                        thumbnails=thumbnails, thumb_size=thumb_size)


# ---------------------------------------------------------------------------------------------- page
def _json_script(obj, element_id: str) -> str:
    # "</" inside a script element would end it early; "<\/" is the same JSON string.
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


_CSS = """
*{box-sizing:border-box}body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f5f6f8}header{background:#22304a;color:#fff;padding:10px 18px}header h1{font-size:17px;margin:0}
header .sub{font-size:12px;opacity:.8;word-break:break-all}main{padding:12px 18px}section{background:#fff;
border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;margin-bottom:12px}h2{font-size:15px;margin:2px 0 8px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eceef2;text-align:left;
font-variant-numeric:tabular-nums}th{font-weight:600;background:#f0f2f5}.muted{color:#667;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.grid>div:first-child{max-width:560px}.controls{display:flex;flex-wrap:wrap;gap:8px;
align-items:center;margin-bottom:8px}.controls label{font-size:12px;color:#445}select,input{font:inherit;padding:3px 5px}
.case{display:grid;grid-template-columns:auto 1fr 1fr 210px;gap:10px;border-top:1px solid #e3e6ea;padding:8px 0}
.case.focus{background:#fff7d6}.thumbs{display:flex;gap:4px;flex-wrap:wrap;max-width:340px}.thumbs figure{margin:0;
text-align:center;font-size:11px;color:#556}.thumb{height:110px;width:auto;background:#000;cursor:zoom-in;
display:block}.thumb.big{height:340px;cursor:zoom-out}.noimg{width:90px;height:110px;background:#e8eaee;display:flex;
align-items:center;justify-content:center;font-size:11px;color:#778}.txt h4{margin:0 0 2px;font-size:12px;color:#556}
.txt p{margin:0 0 6px;white-space:pre-wrap}.ctx{font-size:12px;color:#334;margin-bottom:6px}.ctx b{color:#556}
.badge{display:inline-block;border-radius:10px;padding:1px 7px;margin:1px;font-size:12px;border:1px solid transparent}
.b-agree{background:#d8f0dc;color:#17561f}.b-fp{background:#fde2c8;color:#8a3d00}.b-fn{background:#f8d0d3;
color:#8f1020}.b-unc{border:1px dashed #6a4fb3;background:#ece6fb;color:#3d2a80}.b-neg.b-unc{background:#ece6fb}
.scores{font-size:12px;color:#334;margin-top:4px}.pager{display:flex;gap:8px;align-items:center;margin:8px 0}
.sig{color:#17561f;font-weight:600}.ns{color:#8a6d00}.legend .badge{margin-right:6px}
@media (max-width:900px){.case{grid-template-columns:1fr}.thumbs{max-width:none}}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('viewer-data').textContent);
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const f4 = (v) => v === null || v === undefined ? 'n/a' : Number(v).toFixed(4);
const OBS = D.observations;
const ST = {agree: 'agree', fp: 'false positive', fn: 'false negative', neg: 'uncertain'};
const state = {label: -1, err: 'any', q: '', sort: 'file', minDis: 0, page: 0, size: 50, only: null};

function summary() {
  const m = D.rows.map((r) => `<tr><td>${esc(r.name)}</td><td>${f4(r.value)}</td><td>${r.ci ? '[' + f4(r.ci[0]) + ', ' + f4(r.ci[1]) + ']' : ''}</td></tr>`).join('');
  const boot = D.bootstrap ? `${D.bootstrap.resamples} bootstrap resamples of studies, seed ${D.bootstrap.seed}` : 'no bootstrap';
  const prov = Object.entries(D.provenance || {}).map(([k, v]) => `${esc(k)}=${esc(v)}`).join('; ');
  $('#summary').innerHTML = `<h2>Summary (${D.n} studies)</h2><div class="grid"><div><table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>${m}</table>
   <p class="muted">NLG protocol <b>${esc(D.protocol)}</b> (pycocoevalcap); labeler <b>${esc(D.labeler)}</b>; ${esc(D.convention)}.<br>
   ${D.parity_warning ? '<b class="parity">' + esc(D.parity_warning) + '</b> (run <code>clinicalblip metrics parity</code>)<br>' : ''}Intervals: ${esc(boot)}.${D.manifest ? '<br>Images and context: ' + esc(D.manifest) : '<br>No manifest: no images or context.'}${prov ? '<br>Provenance: ' + prov : ''}</p></div>
   <div>${chart()}</div></div>${ablations()}`;
}

function chart() {
  const rowH = 20, w = 520, left = 190, barW = w - left - 60;
  const rows = D.per_label.map((b, i) => {
    const y = 24 + i * rowH, x = (v) => left + v * barW;
    const ci = b.ci ? `<line x1="${x(b.ci[0])}" x2="${x(b.ci[1])}" y1="${y + 9}" y2="${y + 9}" stroke="#222"/>` : '';
    return `<text x="${left - 6}" y="${y + 12}" text-anchor="end" font-size="11">${esc(b.name)} (n=${b.support})</text>
      <rect x="${left}" y="${y + 1}" width="${b.p * barW}" height="5" fill="#8fb3de"><title>precision ${f4(b.p)}</title></rect>
      <rect x="${left}" y="${y + 6}" width="${b.r * barW}" height="5" fill="#e3b27a"><title>recall ${f4(b.r)}</title></rect>
      <rect x="${left}" y="${y + 11}" width="${b.f1 * barW}" height="6" fill="#2f5f9e"><title>F1 ${f4(b.f1)}</title></rect>${ci}
      <text x="${x(Math.max(b.f1, b.ci ? b.ci[1] : 0)) + 4}" y="${y + 16}" font-size="10">${b.f1.toFixed(3)}</text>`;
  }).join('');
  const h = 30 + D.per_label.length * rowH;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((t) => `<line x1="${left + t * barW}" x2="${left + t * barW}" y1="18" y2="${h - 6}" stroke="#e4e6ea"/><text x="${left + t * barW}" y="14" font-size="10" text-anchor="middle">${t}</text>`).join('');
  return `<svg id="label-chart" width="${w}" height="${h}" role="img" aria-label="per-label precision, recall, F1">${ticks}${rows}</svg>
    <div class="muted">per label: <span style="color:#8fb3de">&#9632;</span> precision <span style="color:#e3b27a">&#9632;</span> recall <span style="color:#2f5f9e">&#9632;</span> F1 with 95% CI</div>`;
}

function ablations() {
  if (!D.ablations.length) return '';
  const keys = ['BLEU_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'clinical_macro_f1'];
  const cell = (r, k) => {
    const v = f4(r.values[k]); const t = r.tests && r.tests[k];
    if (!t) return `<td>${v}</td>`;
    const p = t.p_holm ?? t.p;
    return `<td>${v}<br><span class="${t.significant ? 'sig' : 'ns'}">${t.diff >= 0 ? '+' : ''}${t.diff.toFixed(4)} [${t.ci95[0].toFixed(3)}, ${t.ci95[1].toFixed(3)}] p=${p.toFixed(4)}${t.significant ? '' : ' n.s.'}</span></td>`;
  };
  const rows = D.ablations.map((r) => `<tr><td>${esc(r.label)}</td>${keys.map((k) => cell(r, k)).join('')}</tr>`).join('');
  return `<h2 style="margin-top:12px">Input ablations</h2><table><tr><th>run</th>${keys.map((k) => `<th>${k}</th>`).join('')}</tr>${rows}</table>
    <p class="muted">Second line: difference vs the real-context run, paired bootstrap 95% CI, paired permutation p (Holm-corrected over the ablations); n.s. = not significant at 0.05.</p>`;
}

function matches(c) {
  if (state.only !== null) return c.id === state.only;
  if (c.s.dis < state.minDis) return false;
  if (state.label >= 0 || state.err !== 'any') {
    const ok = c.badges.some((b) => (state.label < 0 || b[0] === state.label) && (
      state.err === 'any' || (state.err === 'uncertain' ? b[2] === 1 : state.err === 'error' ? (b[1] === 'fp' || b[1] === 'fn') : b[1] === state.err)));
    if (!ok) return false;
  }
  if (state.q) {
    const q = state.q;
    if (!(c.id.toLowerCase().includes(q) || c._text.includes(q))) return false;
  }
  return true;
}

const SORTS = {
  file: null,
  id: (a, b) => a.id < b.id ? -1 : a.id > b.id ? 1 : 0,
  dis: (a, b) => b.s.dis - a.s.dis,
  rouge_asc: (a, b) => a.s.rouge - b.s.rouge, rouge_desc: (a, b) => b.s.rouge - a.s.rouge,
  cider_asc: (a, b) => a.s.cider - b.s.cider, cider_desc: (a, b) => b.s.cider - a.s.cider,
};

let filtered = [];
function apply() {
  filtered = D.cases.filter(matches);
  const cmp = SORTS[state.sort];
  if (cmp) filtered.sort(cmp);
  const pages = Math.max(1, Math.ceil(filtered.length / state.size));
  state.page = Math.min(state.page, pages - 1);
  $('#case-count').textContent = filtered.length;
  $('#page-info').textContent = `page ${state.page + 1} of ${pages}`;
  $('#prev').disabled = state.page === 0; $('#next').disabled = state.page >= pages - 1;
  const rows = filtered.slice(state.page * state.size, (state.page + 1) * state.size).map(row).join('');
  $('#cases').innerHTML = rows || '<p class="muted">No study matches these filters.</p>';
}

function row(c) {
  const th = c.views.map((v) => v[0] === null
    ? `<figure><div class="noimg">no image</div>${esc(v[1])}</figure>`
    : `<figure><img class="thumb" loading="lazy" decoding="async" src="${D.thumbs[v[0]]}" alt="${esc(v[1])}">${esc(v[1])}</figure>`).join('') || '<div class="noimg">no images</div>';
  const ctx = ['indication', 'history', 'comparison'].map((k, i) => c.ctx[i] ? `<div><b>${k}:</b> ${esc(c.ctx[i])}</div>` : '').join('');
  const badges = c.badges.map((b) => `<span class="badge b-${b[1]}${b[2] ? ' b-unc' : ''}" data-label="${esc(OBS[b[0]])}" data-status="${b[1]}" title="${esc(ST[b[1]])}${b[2] ? ' (uncertain)' : ''}">${esc(OBS[b[0]])}${b[1] === 'fp' ? ' FP' : b[1] === 'fn' ? ' FN' : ''}${b[2] ? ' ?' : ''}</span>`).join('') || '<span class="muted">no findings either side</span>';
  const lab = (v) => v === null || v === undefined ? 'blank' : ({1: 'pos', 0: 'neg', '-1': 'unc'})[v];
  const cxb = c.s.cxb === undefined ? '' : c.s.cxb.length ? 'CheXbert disagrees: ' + c.s.cxb.map((d) => `${esc(d[0])} (${lab(d[1])}&rarr;${lab(d[2])})`).join(', ') : 'CheXbert agrees on all labels';
  const sc = [D.has_rouge ? `ROUGE-L ${f4(c.s.rouge)}` : '', D.has_cider ? `CIDEr ${f4(c.s.cider)}` : '', `disagreements ${c.s.dis}`,
    c.s.rg === undefined ? '' : `<span class="rg">RadGraph F1 ${f4(c.s.rg)}</span>`, cxb ? `<span class="cxb">${cxb}</span>` : '',
    c.chg && c.chg.prior ? `temporal F1 ${f4(c.chg.t)}` : ''].filter(Boolean).join(' &middot; ');
  const chg = c.chg ? changeBadges(c.chg) : '';
  return `<div class="case${state.only === c.id ? ' focus' : ''}" data-id="${esc(c.id)}"><div class="thumbs">${th}</div>
    <div class="txt"><div class="ctx"><b>${esc(c.id)}</b>${ctx}</div><h4>reference</h4><p>${esc(c.ref)}</p></div>
    <div class="txt"><h4>generated</h4><p>${esc(c.pred)}</p></div><div>${badges}${chg}<div class="scores">${sc}</div></div></div>`;
}

function changeBadges(g) {
  // The prior study: per finding the change the reference states -> the one generated (new / worse / better /
  // unchanged / resolved); without a prior, a report that compares anyway is an invented comparison.
  if (!g.prior) return `<div class="chg"><span class="badge b-neg" data-change="none">no prior</span>${g.inv ? '<span class="badge b-fp" data-change="invented" title="the report compares with a prior the study does not have">invented comparison</span>' : ''}</div>`;
  const keys = [...new Set([...Object.keys(g.ref), ...Object.keys(g.pred)])].sort();
  const b = keys.map((k) => {
    const r = g.ref[k] || '-', p = g.pred[k] || '-';
    const st = r === p ? 'agree' : p === '-' ? 'fn' : 'fp';
    return `<span class="badge b-${st}" data-change="${esc(k)}" title="reference: ${esc(r)}; generated: ${esc(p)}">${esc(k)}: ${esc(r)}${r === p ? '' : ' &rarr; ' + esc(p)}</span>`;
  }).join('');
  return `<div class="chg"><span class="badge b-neg" data-change="prior">prior</span>${b}</div>`;
}

function controls() {
  $('#f-label').innerHTML = '<option value="-1">any label</option>' + OBS.map((o, i) => `<option value="${i}">${esc(o)}</option>`).join('');
  const on = (id, ev, fn) => $(id).addEventListener(ev, () => { fn($(id).value); state.page = 0; apply(); });
  on('#f-label', 'change', (v) => { state.label = Number(v); state.only = null; });
  on('#f-err', 'change', (v) => { state.err = v; state.only = null; });
  on('#f-sort', 'change', (v) => { state.sort = v; });
  on('#f-dis', 'input', (v) => { state.minDis = Number(v) || 0; state.only = null; });
  on('#f-size', 'change', (v) => { state.size = Number(v); });
  let t = null;
  $('#f-q').addEventListener('input', () => { clearTimeout(t); t = setTimeout(() => { state.q = $('#f-q').value.trim().toLowerCase(); state.only = null; state.page = 0; apply(); }, 120); });
  $('#prev').addEventListener('click', () => { state.page--; apply(); window.scrollTo(0, $('#browser').offsetTop); });
  $('#next').addEventListener('click', () => { state.page++; apply(); window.scrollTo(0, $('#browser').offsetTop); });
  $('#f-clear').addEventListener('click', () => {
    Object.assign(state, {label: -1, err: 'any', q: '', minDis: 0, page: 0, only: null});
    $('#f-label').value = '-1'; $('#f-err').value = 'any'; $('#f-q').value = ''; $('#f-dis').value = '0'; history.replaceState(null, '', '#'); apply();
  });
  $('#cases').addEventListener('click', (e) => { if (e.target.classList.contains('thumb')) e.target.classList.toggle('big'); });
  if (!D.has_rouge) for (const o of document.querySelectorAll('#f-sort option[value^=rouge]')) o.remove();
  if (!D.has_cider) for (const o of document.querySelectorAll('#f-sort option[value^=cider]')) o.remove();
}

function fromHash() {
  const m = /case=([^&]+)/.exec(location.hash);
  state.only = m ? decodeURIComponent(m[1]) : null;
  state.page = 0;
  apply();
  if (state.only !== null) { const el = document.querySelector('.case.focus'); if (el) el.scrollIntoView(); }
}

for (const c of D.cases) c._text = (c.ref + '\n' + c.pred + '\n' + c.ctx.join('\n')).toLowerCase();
$('#case-total').textContent = D.n;
summary(); controls();
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def render_page(data: Mapping) -> str:
    """The complete HTML document for ``viewer_data``'s dict."""
    title = _html.escape(data["title"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>clinicalblip cases: {title}</title><style>{_CSS}</style></head>
<body><header><h1>clinicalblip case viewer</h1><div class="sub">{title}</div></header><main>
<section id="summary"></section>
<section id="browser"><h2>Cases: <span id="case-count">0</span> of <span id="case-total">0</span></h2>
<div class="controls">
<label>label <select id="f-label"></select></label>
<label>error <select id="f-err"><option value="any">any</option><option value="error">FP or FN</option>
<option value="fn">false negative</option><option value="fp">false positive</option><option value="agree">agree</option>
<option value="uncertain">uncertain</option></select></label>
<label>min disagreements <input id="f-dis" type="number" min="0" value="0" style="width:4em"></label>
<label>sort <select id="f-sort"><option value="file">file order</option><option value="id">id</option>
<option value="dis">most disagreements</option><option value="rouge_asc">ROUGE-L, lowest first</option>
<option value="rouge_desc">ROUGE-L, highest first</option><option value="cider_asc">CIDEr, lowest first</option>
<option value="cider_desc">CIDEr, highest first</option></select></label>
<label>search <input id="f-q" type="search" placeholder="id or text"></label>
<label>per page <select id="f-size"><option>25</option><option selected>50</option><option>100</option><option>200</option></select></label>
<button id="f-clear" type="button">clear</button></div>
<div class="legend muted"><span class="badge b-agree">agree</span><span class="badge b-fp">false positive</span>
<span class="badge b-fn">false negative</span><span class="badge b-neg b-unc">uncertain ?</span>
status from the labeler on the reference (or true labels) and on the generated report</div>
<div class="pager"><button id="prev" type="button">&larr; prev</button><span id="page-info"></span>
<button id="next" type="button">next &rarr;</button></div>
<div id="cases"></div></section></main>
{_json_script(data, "viewer-data")}
<script>{_JS}</script></body></html>
"""


# ---------------------------------------------------------------------------------------------- compare page
def relpath(target: str | Path, start_file: str | Path) -> str:
    """``target`` relative to the folder of ``start_file`` (links that survive copying both to a USB stick)."""
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(start_file))).replace(os.sep, "/")


def write_compare_html(result: Mapping, out_html: str | Path, viewers: Sequence[str | Path | None]) -> Path:
    """compare.html: the paired-test tables and the studies where the systems' findings disagree most, each
    linking into every system's viewer (``VIEWER#case=ID``, relative links)."""
    out_html = Path(out_html)
    names = [s["name"] for s in result["systems"]]
    links = {n: (relpath(v, out_html) if v else None) for n, v in zip(names, viewers)}
    esc = _html.escape
    parts = []
    hidden = set(result.get("empty_rows", []))  # labels nobody wrote and no reference has: 0 vs 0
    for c in result["comparisons"]:
        rows = []
        for k, m in c["metrics"].items():
            if k in hidden:
                continue
            cls = "sig" if m["significant"] else "ns"
            a = "n/a" if m["a"] is None else f"{m['a']:.4f}"
            b = "n/a" if m["b"] is None else f"{m['b']:.4f}"
            rows.append(f"<tr><td>{esc(k)}</td><td>{a}</td><td>{b}</td><td class='{cls}'>{m['diff']:+.4f}</td>"
                        f"<td>[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]</td><td>{m['p']:.4f}</td>"
                        f"<td class='{cls}'>{m['p_holm']:.4f}{'' if m['significant'] else ' n.s.'}</td></tr>")
        parts.append(f"<section><h2>{esc(c['b'])} vs {esc(c['a'])} (diff = B &minus; A)</h2><table><tr><th>metric</th>"
                     f"<th>A: {esc(c['a'])}</th><th>B: {esc(c['b'])}</th><th>B &minus; A</th><th>95% CI</th><th>p</th>"
                     f"<th>p (Holm)</th></tr>{''.join(rows)}</table></section>")
    dis = []
    for d in result["disagreements"]:
        cells = []
        for n in names:
            link = links.get(n)
            view = f" <a href='{esc(link)}#case={esc(quote(d['id'], safe=''))}'>open in viewer</a>" if link else ""
            cells.append(f"<td><b>{esc(n)}</b>{view}<p>{esc(d['predictions'][n])}</p></td>")
        labs = ", ".join(
            f"{esc(x['label'])} (ref {x['reference']}: " + ", ".join(f"{esc(n)} {v}" for n, v in x["systems"].items())
            + ")" for x in d["labels"])
        dis.append(f"<tr><td><b>{esc(d['id'])}</b><br><span class='muted'>{d['n_labels']} labels differ: {labs}</span>"
                   f"<p>{esc(d['reference'])}</p></td>{''.join(cells)}</tr>")
    systems = "".join(f"<li><b>{esc(s['name'])}</b>: {esc(s['path'])} ({s['studies_in_file']} studies)"
                      + (f" &mdash; <a href='{esc(links[s['name']])}'>viewer</a>" if links.get(s["name"]) else "")
                      + "</li>" for s in result["systems"])
    method = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in result["method"].items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>clinicalblip compare</title><style>{_CSS} td p{{white-space:pre-wrap;margin:4px 0;max-width:480px}}</style></head>
<body><header><h1>clinicalblip compare</h1><div class="sub">{result['shared']} shared studies; protocol
{esc(str(result['protocol']))}; labeler {esc(str(result['labeler']))}; {result['resamples']} resamples, seed
{result['seed']}</div></header><main><section><h2>Systems</h2><ul>{systems}</ul><ul class="muted">{method}</ul></section>
{''.join(parts)}
<section><h2>Where the findings disagree most ({len(result['disagreements'])} studies)</h2><table>
<tr><th>study / reference</th>{''.join(f'<th>{esc(n)}</th>' for n in names)}</tr>{''.join(dis)}</table></section>
</main></body></html>
"""
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html
