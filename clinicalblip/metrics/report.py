"""Human-readable evaluation output: report.md with the tables, a PNG of per-label F1, and comparison tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from clinicalblip.metrics.nlg import METRIC_KEYS

log = logging.getLogger(__name__)


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(block: Mapping) -> str:
    ci = block.get("f1_ci95")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _absent(b: Mapping) -> bool:
    """A label with no support in the references and never predicted: its P/R/F1 are undefined, not 0."""
    return b.get("support") == 0 and b.get("predicted") == 0


def present_macro(clinical: Mapping) -> dict | None:
    """Macro P/R/F1 over the labels present on either side (support or predictions), beside the all-label macro."""
    present = [b for b in clinical.get("per_label", {}).values() if not _absent(b)]
    if not present:
        return None
    n = len(present)
    return {"precision": sum(b["precision"] for b in present) / n, "recall": sum(b["recall"] for b in present) / n,
            "f1": sum(b["f1"] for b in present) / n, "labels": n}


def labeler_note(clinical: Mapping) -> str | None:
    """Why these clinical numbers are not the CheXbert F1 that papers report, when they are not."""
    name = str(clinical.get("labeler", ""))
    if "chexbert" in name.lower():
        return None
    if name.startswith("chexpert"):
        return (f"The clinical scores use `{name}`, clinicalblip's built-in CheXpert-style rule labeler: its F1 is "
                "not CheXbert F1 and is not comparable with papers that report CheXbert (`--labeler chexbert` with "
                "local weights gives that).")
    return f"The clinical scores use the `{name}` labels, not CheXbert: not comparable with CheXbert F1 in papers."


def plot_per_label_f1(clinical: Mapping, png_path: str | Path) -> Path | None:
    """Horizontal bars of per-label F1 with their 95 % intervals; None (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the per-label F1 plot (pip install matplotlib)")
        return None
    labels = list(clinical["per_label"])
    f1 = [clinical["per_label"][o]["f1"] for o in labels]
    cis = [clinical["per_label"][o].get("f1_ci95") for o in labels]
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(labels) + 1.4))
    ypos = list(range(len(labels)))[::-1]
    xerr = None
    if all(cis):
        xerr = [[max(0.0, f - c[0]) for f, c in zip(f1, cis)], [max(0.0, c[1] - f) for f, c in zip(f1, cis)]]
    ax.barh(ypos, f1, xerr=xerr, color="#4c72b0", ecolor="#333333", capsize=3)
    ax.set_yticks(ypos)
    ax.set_yticklabels([f"{o} (n={clinical['per_label'][o]['support']})" for o in labels], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (95% bootstrap CI)" if xerr else "F1")
    macro = clinical["macro"]["f1"]
    ax.axvline(macro, color="#c44e52", linestyle="--", linewidth=1, label=f"macro F1 {macro:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Per-label F1 — {clinical['labeler']}", fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def render_markdown(metrics: Mapping, png_name: str | None = None) -> str:
    """The report.md text for one metrics dict (as written to metrics.json)."""
    c = metrics["clinical"]
    lines = ["# Evaluation report", ""]
    lines.append(f"- predictions: `{metrics.get('predictions', '?')}` ({metrics['n']} reports"
                 + (f", {metrics['empty_predictions']} empty" if metrics.get("empty_predictions") else "") + ")")
    lines.append(f"- NLG protocol: `{metrics['protocol']}` (pycocoevalcap)")
    lines.append(f"- clinical labeler: `{c['labeler']}`; {c['convention']}")
    prov = metrics.get("provenance")
    if isinstance(prov, Mapping):
        keep = {k: v for k, v in prov.items() if isinstance(v, (str, int, float, bool)) or v is None}
        if keep:
            lines.append("- provenance: " + ", ".join(f"{k}={v}" for k, v in list(keep.items())[:12]))
    if metrics.get("skipped"):
        lines.append(f"- skipped (no Java): {', '.join(metrics['skipped'])}")
    lines += ["", f"## Language metrics ({metrics['protocol']})", ""]
    lines.append("| " + " | ".join(METRIC_KEYS) + " |")
    lines.append("|" + "---|" * len(METRIC_KEYS))
    lines.append("| " + " | ".join(_fmt(metrics.get(k)) for k in METRIC_KEYS) + " |")
    lines += ["", "## Clinical efficacy", ""]
    lines.append("| | precision | recall | F1 | F1 95% CI |")
    lines.append("|---|---|---|---|---|")
    present = present_macro(c)
    for key, title in (("macro", f"macro ({len(c['observations'])} labels)"), ("present", None),
                       ("micro_5", "micro (5 common)"), ("micro", "micro (all labels)"), ("no_finding", "No Finding")):
        if key == "present":
            if present is not None and present["labels"] < len(c["per_label"]):
                lines.append(f"| **macro ({present['labels']} labels present)** | {_fmt(present['precision'])} | "
                             f"{_fmt(present['recall'])} | {_fmt(present['f1'])} | |")
            continue
        if key in c:
            b = c[key]
            lines.append(f"| **{title}** | {_fmt(b['precision'])} | {_fmt(b['recall'])} | {_fmt(b['f1'])} | {_ci(b)} |")
    lines += ["", "| observation | support | predicted | precision | recall | F1 | F1 95% CI |",
              "|---|---|---|---|---|---|---|"]
    for o, b in c["per_label"].items():
        if _absent(b):  # neither the references nor the predictions have it: undefined, not 0.000
            lines.append(f"| {o} | 0 | 0 | n/a | n/a | n/a | |")
            continue
        lines.append(f"| {o} | {b['support']} | {b['predicted']} | {_fmt(b['precision'])} | {_fmt(b['recall'])} "
                     f"| {_fmt(b['f1'])} | {_ci(b)} |")
    absent = [o for o, b in c["per_label"].items() if _absent(b)]
    if absent:
        lines += ["", f"n/a: {', '.join(absent)} — no support in the references and never predicted. The "
                      f"{len(c['observations'])}-label macro counts them as 0; the present-label macro leaves them "
                      "out."]
    note = labeler_note(c)
    if note:
        lines += ["", note]
    if "bootstrap" in c:
        bs = c["bootstrap"]
        lines += ["", f"Intervals: {bs['resamples']} bootstrap resamples of reports, seed {bs['seed']}, "
                      f"{bs['interval']}."]
    lines += _neural_lines(metrics)
    if png_name:
        lines += ["", f"![per-label F1]({png_name})"]
    return "\n".join(lines) + "\n"


def _neural_lines(metrics: Mapping) -> list[str]:
    """The section of ``eval --metrics-dir``: every neural key with its value, and the parity flag."""
    if "neural" not in metrics:
        return []
    from clinicalblip.metrics.conventions import convention_keys
    from clinicalblip.metrics.neural_eval import NEURAL_SUMMARY_KEYS

    nb = metrics["neural"]
    lines = ["", "## Neural clinical metrics", "",
             f"- weights folder: `{nb['metrics_dir']}`; metrics: {', '.join(nb['metrics'])}"]
    if metrics.get("parity_not_checked"):
        lines.append(f"- **parity not checked**: {', '.join(metrics['parity_not_checked'])} were not yet compared "
                     "with the reference packages on this weights folder (`clinicalblip metrics parity`)")
    else:
        lines.append(f"- {nb['parity']}")
    lines += ["", "| key | value |", "|---|---|"]
    keys = [k for k in (*convention_keys("chexbert"), *NEURAL_SUMMARY_KEYS) if k in metrics]
    for k in dict.fromkeys(keys):
        lines.append(f"| `{k}` | {_fmt(metrics[k])} |")
    return lines


def write_report(metrics: Mapping, md_path: str | Path) -> Path:
    """Write report.md and its PNG beside it: ``per_label_f1.png`` for report.md, ``X_f1.png`` for X.report.md."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    stem = md_path.name.removesuffix(".md").removesuffix(".report")  # metrics_x.report.md -> metrics_x_f1.png
    png = md_path.with_name("per_label_f1.png" if stem == "report" else f"{stem}_f1.png")
    made = plot_per_label_f1(metrics["clinical"], png)
    md_path.write_text(render_markdown(metrics, made.name if made else None), encoding="utf-8")
    return md_path


def comparison_table(rows: Mapping[str, str | Path | Mapping]) -> str:
    """A markdown table with one row per named run (a metrics.json path or dict), e.g. the input ablations.

    Columns: the NLG metrics, clinical macro F1 (with its CI) and, when present, micro-5 and No Finding F1.
    """
    header = ["run", *METRIC_KEYS, "clinical macro F1", "macro F1 95% CI", "micro-5 F1", "No Finding F1"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        if not isinstance(m, Mapping):
            m = json.loads(Path(m).read_text(encoding="utf-8"))
        c = m.get("clinical", {})
        cells = [name, *(_fmt(m.get(k)) for k in METRIC_KEYS), _fmt(m.get("clinical_macro_f1")),
                 _ci(c.get("macro", {})), _fmt(c.get("micro_5", {}).get("f1")), _fmt(c.get("no_finding", {}).get("f1"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
