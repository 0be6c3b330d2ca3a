"""Split a free-text radiology report into sections, the way the official MIMIC-CXR section parser does.

The MIMIC-CXR release (github.com/MIT-LCP/mimic-cxr, txt/section_parser.py) finds upper-case headers that start
a line and end with a colon ("INDICATION:", "COMPARISON:", "FINDINGS:", "IMPRESSION:"), maps the many variants
onto a few canonical names (REASON FOR EXAMINATION -> indication, CLINICAL INFORMATION -> history,
CONCLUSION -> impression, misspellings, "PA AND LATERAL VIEWS OF THE CHEST" -> findings ...), drops empty
findings/impression sections, and when a report has neither, takes its last paragraph. This module follows the
same rules (re-implemented, not copied) with two relaxations for hospital exports: a header may start the text
or a line without the leading space MIMIC uses, and title-case headers are accepted when the name is a known one.
"""

from __future__ import annotations

import re

from clinicalblip.data.text import collapse_whitespace, tidy_text

# Header name (lower case) -> canonical section. Counts in the official parser's comments show these cover
# nearly all MIMIC-CXR reports.
SECTION_ALIASES: dict[str, str] = {
    "preamble": "preamble",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impression/findings": "impression",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "comparison study": "comparison",
    "comparison studies": "comparison",
    "reference exam": "comparison",
    "prior": "comparison",
    "priors": "comparison",
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "reason for study": "indication",
    "reason for the exam": "indication",
    "reason for the examination": "indication",
    "reason": "indication",
    "findings": "findings",
    "finding": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "notification": "notification",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "addendum": "addendum",
    "wet read": "wet read",
    "wetread": "wet read",
    "date": "date",
    "comment": "comment",
    "comments": "comment",
    # misspellings seen in MIMIC-CXR
    "impresson": "impression", "imprression": "impression", "imoression": "impression",
    "impressoin": "impression", "imprssion": "impression", "impresion": "impression",
    "imperssion": "impression", "mpression": "impression", "impession": "impression",
    "ndication": "impression",  # sic: the official parser maps this one to impression
    "findins": "findings", "findindgs": "findings", "findgings": "findings", "findngs": "findings",
    "findnings": "findings", "finidngs": "findings",
    "idication": "indication",
    "comparision": "comparison", "comparsion": "comparison", "comparrison": "comparison",
    "comparisions": "comparison",
    "concusion": "impression", "coinclusion": "impression",
}

# Names containing one of these words map to it (after the exact aliases, in this order).
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# A header that describes the whole study ("PA AND LATERAL VIEWS OF THE CHEST:") introduces the findings.
_STUDY_DESCRIPTION_RE = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|"
    r"frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright|ribs"
)

# A header: at the start of a line (optionally indented), a name of letters, blanks and ()/,&- , a colon,
# then whitespace or the end of the text.
_HEADER_RE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/,&-]{0,60}?)[ \t]*:(?=\s|$)", re.MULTILINE)

CONTEXT_SECTIONS = ("indication", "history", "comparison")
REPORT_SECTIONS = ("findings", "impression")


def normalize_section_name(name: str) -> str:
    """Canonical section name for a header ("REASON FOR EXAMINATION" -> "indication")."""
    s = collapse_whitespace(name).lower()
    if s in SECTION_ALIASES:
        return SECTION_ALIASES[s]
    for main in _MAIN_SECTIONS:
        if main in s:
            return main
    if _STUDY_DESCRIPTION_RE.search(s):
        return "findings"
    return s


def _is_header(name: str) -> bool:
    name = name.strip()
    if not name:
        return False
    # Upper case like MIMIC; title or lower case only for names we know (so "Lungs: clear" stays text).
    if name.upper() == name and any(c.isalpha() for c in name):
        return True
    return collapse_whitespace(name).lower() in SECTION_ALIASES


def split_sections(text: str) -> list[tuple[str, str]]:
    """The report as (canonical section name, raw section text) pairs in order of appearance.

    Text before the first header is "preamble". A report without any header is one "full report" section.
    Empty findings / impression sections are dropped, and when neither is left, the last paragraph of the
    last section becomes a "last_paragraph" section (the official parser's rule).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header(m.group(1))]
    if not headers:
        return [("full report", text)]
    parts: list[tuple[str, str]] = [("preamble", text[: headers[0].start()])]
    for i, m in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        parts.append((normalize_section_name(m.group(1)), text[m.end():end]))
    parts = [(n, t) for n, t in parts if not (n in REPORT_SECTIONS and not t.strip())]
    if not any(n in REPORT_SECTIONS for n, _ in parts):
        name, last = parts[-1]
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", last.strip("\n")) if p.strip()]
        if len(paragraphs) > 1:
            parts[-1] = (name, paragraphs[0])
            parts.append(("last_paragraph", "\n\n".join(paragraphs[1:])))
    return parts


def parse_report(text: str | None) -> dict[str, str]:
    """Canonical sections of a report with whitespace collapsed: {"indication": ..., "findings": ..., ...}.

    When a section appears more than once the last non-empty one wins (as in the official parser's
    section files). A report without headers gives {"full report": text}.
    """
    out: dict[str, str] = {}
    if not text:
        return out
    for name, body in split_sections(text):
        body = collapse_whitespace(body)
        if body:
            out[name] = body
    return out


def report_fields(text: str | None) -> dict[str, str | None]:
    """The manifest's text fields from a full report.

    indication / history / comparison / findings / impression from their sections, placeholders such as
    "None." as None (text.tidy_text). A report with no
    headers at all is taken as findings; one with headers but neither findings nor impression gets its
    last paragraph as the impression.
    """
    sec = parse_report(text)
    fields: dict[str, str | None] = {k: tidy_text(sec.get(k)) for k in CONTEXT_SECTIONS + REPORT_SECTIONS}
    if "full report" in sec and not fields["findings"]:
        fields["findings"] = sec["full report"]
    if not fields["findings"] and not fields["impression"] and "last_paragraph" in sec:
        fields["impression"] = sec["last_paragraph"]
    return fields
