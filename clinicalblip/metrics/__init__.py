"""Evaluation: NLG metrics under named protocols (nlg), a CheXpert-style report labeler (labeler), clinical
efficacy with bootstrap intervals (clinical), the predictions-file evaluation behind `clinicalblip eval`
(evaluate_predictions), report.md / plots (report), and an offline `evaluate` module (report_nlg/).

Submodules are imported on use so `import clinicalblip.metrics` stays cheap.
"""

from __future__ import annotations

from pathlib import Path


def evaluate_module_path() -> str:
    """Folder of the `evaluate` module: pass it to ``evaluate.load(...)`` (works offline)."""
    return str(Path(__file__).resolve().parent / "report_nlg")
