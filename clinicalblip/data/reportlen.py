"""Report lengths against data.max_report_tokens: what the run header and `data check` say about truncation.

A report longer than the limit is cut in training (and its labels then end without EOS, see collate.py); these
helpers count how many are cut and print the length distribution. They take the lengths (or a counting
function) from the caller: data/ knows nothing of the model's tokenizer.
"""

from __future__ import annotations

from typing import Callable

from clinicalblip.data.manifest import SPLITS
from clinicalblip.prompts import Template, target_text


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of integer lengths; 0 for none."""
    if not values:
        return 0
    s = sorted(values)
    k = max(1, -(-len(s) * q // 100))  # ceil(n q / 100), at least the first
    return int(s[min(len(s), int(k)) - 1])


def cut_summary(lengths: list[int], limit: int, what: str = "train reports", unit: str = "tokens") -> str:
    """"N of M <what> cut at L <unit>; p95 length X": the run header's line on report truncation."""
    n_cut = sum(1 for n in lengths if n > limit)
    return (f"{n_cut} of {len(lengths)} {what} cut at {limit} {unit}; p95 length {percentile(lengths, 95)}"
            + (f", longest {max(lengths)}" if lengths else ""))


def length_report(lengths: list[int], limit: int | None = None, unit: str = "words", what: str = "reports") -> str:
    """What `data check` prints about report lengths: percentiles, and how many exceed the limit."""
    if not lengths:
        return f"{what} length: no reports"
    pcts = "  ".join(f"p{q} {percentile(lengths, q)}" for q in (50, 90, 95, 99))
    line = f"{what} length ({unit}, n={len(lengths)}): {pcts}  max {max(lengths)}"
    if limit is not None:
        n_cut = sum(1 for n in lengths if n > limit)
        line += (f"\n  limit {limit} {unit} (data.max_report_tokens): {n_cut} of {len(lengths)} "
                 f"({100 * n_cut / len(lengths):.1f}%) are longer and would be cut")
    return line


def split_report_lengths(records: list[dict], target: str | None, limit: int | None = None,
                         count: Callable[[list[str]], list[int]] | None = None, unit: str = "words") -> str:
    """Length lines for the train/val/test records' target section (both sections when target is None).

    count: texts -> lengths (a tokenizer's); default: whitespace words (a subword tokenizer gives more
    tokens than words, so words understate how many reports are cut).
    """
    count = count or (lambda texts: [len(t.split()) for t in texts])
    lines = []
    for section in ([target] if target else ["findings", "impression"]):
        tpl = Template(name="check", prompt="", target=section)
        texts = [t for t in (target_text(tpl, r) for r in records if r.get("split") in SPLITS) if t]
        lines.append(length_report(count(texts) if texts else [], limit, unit=unit, what=section))
    if unit == "words" and limit is not None:
        lines.append("  (words, not tokens: pass --tokenizer MODEL_FOLDER for the model's token count)")
    return "\n".join(lines)
