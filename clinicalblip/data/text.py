"""Report text: tidying for manifests, cleaning for targets, and the clinical-context normaliser for prompts.

Three levels, from most faithful to most opinionated:

- `tidy_text`: what `data prepare` stores. Whitespace collapsed, trimmed, empty and placeholder values
  ("None.", "None available", "N/A", ...) become None. De-identification marks are kept exactly as the
  source wrote them (IU X-Ray `XXXX`, MIMIC-CXR `___`), so the manifest stays a faithful copy of the data.
- `clean_report`: report text as a training target or reference: tidied, list numbering removed, spacing
  around punctuation repaired; de-identification marks kept, unified, or dropped (`deid=`).
- `normalize_context`: indication / history / comparison as they go into a prompt. Tidied, runs of
  de-identification marks collapsed into one `___`, and None when nothing informative is left (an indication
  that is only `XXXX` tells the model nothing, and an empty "Indication:" line is better left out).
"""

from __future__ import annotations

import re
import unicodedata

DEID_MARK = "___"

# IU X-Ray writes de-identified words as XXXX (always upper case); MIMIC-CXR as three or more underscores.
_DEID = r"(?:(?<![A-Za-z])X{3,}|_{2,})"
_DEID_RE = re.compile(_DEID)
# A run of marks separated only by blanks or commas ("XXXX XXXX XXXX", "XXXX, XXXX") is one redaction.
_DEID_RUN_RE = re.compile(rf"{_DEID}(?:[ \t]*,?[ \t]*{_DEID})*")

_WS_RE = re.compile(r"\s+")
# Characters that look like spaces but are not matched by every tokenizer the same way.
_SPACE_LIKE = dict.fromkeys(map(ord, "\u00a0\u2007\u202f\u2009\u200a\u3000\ufeff"), " ")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060"), None)

# Whole-field values that mean "nothing here". Matched against the lower-cased text without trailing
# punctuation, after de-identification marks are removed.
_PLACEHOLDER_RE = re.compile(
    r"^(?:"
    r"none(?: (?:available|given|provided|known|stated|specified|noted))?"
    r"|n/?a|nil|null|nan|unknown|unavailable|not (?:available|applicable|given|provided|known|stated|specified)"
    r"|no (?:indication|history|clinical history|comparison|comparisons|priors?|prior (?:studies|study|exams?|films?|images?))"
    r"(?: (?:available|given|provided|stated))?"
    r"|-+|\?+|\.+"
    r")$"
)

_ENUM_RE = re.compile(r"(?:(?<=^)|(?<=[.:;!?]\s))\(?\d{1,2}[.)]\s+(?=[A-Za-z])")
_MISSING_SPACE_RE = re.compile(r"(?<=[a-z])([.!?])(?=[A-Z][a-z])")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")
_REPEATED_PERIOD_RE = re.compile(r"\.(?:\s*\.)+")


def _normalize_chars(text: str) -> str:
    if text.isascii():  # the common case, and NFC / the tables below change nothing in ASCII
        return text
    text = unicodedata.normalize("NFC", text)
    return text.translate(_SPACE_LIKE).translate(_ZERO_WIDTH)


def collapse_whitespace(text: str) -> str:
    """All whitespace runs (newlines included) become one space; ends trimmed."""
    return _WS_RE.sub(" ", _normalize_chars(text)).strip()


def is_placeholder(text: str | None) -> bool:
    """True for empty text and for values that mean "nothing here" ("None.", "N/A", "None available", ...)."""
    if text is None:
        return True
    if len(text) > 80:  # placeholders are short; long text is never one
        return False
    core = collapse_whitespace(str(text)).lower().rstrip(" .;:,")
    return core == "" or bool(_PLACEHOLDER_RE.match(core))


def tidy_text(text) -> str | None:
    """The faithful form stored in manifests: whitespace collapsed, placeholders -> None, marks kept."""
    if text is None:
        return None
    if not isinstance(text, str):
        if isinstance(text, float) and text != text:  # NaN from pandas-made files
            return None
        text = str(text)
    text = collapse_whitespace(text)
    return None if is_placeholder(text) else text


def has_deid(text: str | None) -> bool:
    """Whether the text contains a de-identification mark (XXXX or ___)."""
    return bool(text) and _DEID_RE.search(text) is not None


def unify_deid(text: str, mark: str = DEID_MARK) -> str:
    """Replace every run of de-identification marks by one `mark`."""
    return _DEID_RUN_RE.sub(mark, text)


def drop_deid(text: str) -> str:
    """Remove de-identification marks and the blank left behind ("There is XXXX scarring" -> "There is scarring")."""
    text = _DEID_RUN_RE.sub("", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text).strip()


def _informative(text: str) -> bool:
    """Something besides marks, punctuation and placeholder words remains."""
    rest = _DEID_RE.sub(" ", text)
    if not re.search(r"[A-Za-z0-9]", rest):
        return False
    return not is_placeholder(rest)


def normalize_context(text, mark: str = DEID_MARK) -> str | None:
    """Indication / history / comparison text as it should appear in a prompt, or None to leave it out.

    Whitespace is collapsed, each run of de-identification marks (`XXXX`, `___`) becomes one `mark`, and
    text that carries no information — empty, a placeholder such as "None." or "N/A", or only marks and
    punctuation such as "XXXX." — gives None. Partly redacted text keeps its information:
    "XXXX-year-old female with chest pain" -> "___-year-old female with chest pain".
    """
    text = tidy_text(text)
    if text is None or not _informative(text):
        return None
    # Stray separators left at the ends by the source's templating (",786.2", "786.05-", "Cough;").
    return unify_deid(text, mark).strip(" ,;:-/")


def clean_report(text, deid: str = "keep") -> str:
    """A report (findings / impression) cleaned as a training target or reference; "" for nothing.

    Whitespace collapsed, list numbering ("1. ", "2)") removed, a missing space after a sentence end
    restored ("apex.There" -> "apex. There"), spaces before punctuation and repeated periods removed.
    `deid`: "keep" leaves XXXX / ___ as written, "mark" unifies each run into `___`, "drop" removes them.
    """
    if deid not in ("keep", "mark", "drop"):
        raise ValueError(f"deid must be 'keep', 'mark' or 'drop', not {deid!r}")
    text = tidy_text(text)
    if text is None:
        return ""
    text = _ENUM_RE.sub("", text)
    text = _MISSING_SPACE_RE.sub(r"\1 ", text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    text = _REPEATED_PERIOD_RE.sub(".", text)
    if deid == "mark":
        text = unify_deid(text)
    elif deid == "drop":
        text = drop_deid(text)
    return collapse_whitespace(text)


# Signs that text was decoded with the wrong codec: U+FFFD, or UTF-8 read as Latin-1 / cp1252 ("Ã©", "â€™").
_MOJIBAKE_RE = re.compile("\ufffd|[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def encoding_problem(text: str | None) -> str | None:
    """A short description of an encoding defect in `text` (replacement characters, mojibake, control bytes)."""
    if not text:
        return None
    m = _MOJIBAKE_RE.search(text)
    if m:
        frag = m.group(0)
        if frag == "\ufffd":
            return "contains U+FFFD replacement characters (text decoded with the wrong encoding)"
        return f"contains mojibake {frag!r} (UTF-8 text decoded as Latin-1/cp1252)"
    m = _CONTROL_RE.search(text)
    if m:
        return f"contains control character {m.group(0)!r}"
    return None
