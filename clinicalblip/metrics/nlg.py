"""NLG metrics for reports: pycocoevalcap BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D under a named protocol.

Protocols (the numbers differ between them, so every result carries its protocol's name):

- ``r2gen`` (default): R2Gen's IU X-Ray report cleaning (``clean_report_iu_xray`` in R2Gen's
  ``modules/tokenizers.py``, https://github.com/cuhksz-nlp/R2Gen): lowercase, list numbering removed, punctuation
  stripped, "." kept as a sentence token; then the pycocoevalcap scorers called the way R2Gen's
  ``modules/metrics.py::compute_scores`` calls them (corpus BLEU via ``Bleu(4).compute_score(gts, res,
  verbose=0)``, corpus METEOR, mean ROUGE-L) plus CIDEr-D, which later papers report beside them.
- ``r2gen-mimic``: the same with R2Gen's MIMIC-CXR cleaning (``clean_report_mimic_cxr``: also folds newlines,
  runs of spaces and underscores first).
- ``coco-ptb``: the COCO caption protocol: Stanford PTBTokenizer (lowercase, punctuation tokens dropped), then
  the same scorers.

Java runs METEOR (and the PTB tokenizer for ``coco-ptb``). One METEOR process is started per Python process and
reused by every call (it takes ~10 s to load its paraphrase tables); ``close_meteor()`` ends it early.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Iterable, Sequence

from clinicalblip.errors import UserError

log = logging.getLogger(__name__)

PROTOCOLS = ("r2gen", "r2gen-mimic", "coco-ptb")
METRIC_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_METRICS = ("METEOR",)


class JavaMissingError(UserError):
    """Java is needed (METEOR, PTB tokenizer) but not on PATH."""


# ---------------------------------------------------------------------------------------------- cleaning
# R2Gen strips these characters inside each sentence. Their regex '[.,?;*!%^&_+():-\[\]{}]' contains the range
# ':-\[' (':' .. '['), i.e. also ';<=>?@' and 'A'-'Z' (already lowercased) but NOT a literal '-': hyphens survive.
# Written out here so the set is visible; it must stay identical for the numbers to match R2Gen's.
_R2GEN_STRIP = re.compile(r"[.,?;*!%^&_+():<=>@A-Z\[\]{}]")
_R2GEN_DROP = str.maketrans("", "", "\"/\\'")  # removed before the regex (quotes, slashes, apostrophes)

# R2Gen removes list numbering with fixed literal replacements (only "1." to "5."), in this order.
_R2GEN_NUMBERING = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                    (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))


def _replace_n(text: str, old: str, new: str, times: int) -> str:
    # R2Gen chains .replace() a fixed number of times (not "until stable"); keep that exact behaviour.
    for _ in range(times):
        text = text.replace(old, new)
    return text


def clean_report_r2gen(report: str, variant: str = "iu_xray") -> str:
    """Clean one report the way R2Gen does before tokenising (``variant``: ``iu_xray`` or ``mimic_cxr``).

    Sentences are split on ". ", stripped of punctuation and joined with " . ", and a final " ." is appended, so
    an empty report becomes " .". Empty sentences are kept (as R2Gen does), which can leave double spaces.
    """
    text = report or ""
    if variant == "mimic_cxr":
        text = text.replace("\n", " ")
        text = _replace_n(text, "__", "_", 7)
        text = _replace_n(text, "  ", " ", 6)
        text = _replace_n(text, "..", ".", 8)
    elif variant == "iu_xray":
        text = _replace_n(text, "..", ".", 3)
    else:
        raise ValueError(f"unknown R2Gen cleaning variant {variant!r}")
    for old, new in _R2GEN_NUMBERING:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    cleaned = [_R2GEN_STRIP.sub("", s.translate(_R2GEN_DROP).strip().lower()) for s in sentences]
    return " . ".join(cleaned) + " ."


# ---------------------------------------------------------------------------------------------- java
def java_available() -> bool:
    return shutil.which("java") is not None


def _require_java(what: str) -> None:
    if not java_available():
        raise JavaMissingError(
            f"Java was not found on PATH; {what} needs it (pycocoevalcap runs its .jar files). Install a Java "
            "runtime (e.g. apt-get install default-jre), or skip it: `clinicalblip eval --skip-java-metrics` / "
            "compute_nlg(..., skip=('METEOR',)) with --protocol r2gen (coco-ptb always needs Java for the PTB "
            "tokenizer)."
        )


def _pycocoevalcap_dir(sub: str) -> str:
    try:
        import pycocoevalcap
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UserError("NLG metrics need pycocoevalcap: pip install pycocoevalcap") from exc
    return os.path.join(list(pycocoevalcap.__path__)[0], sub)


# Characters that would end a line for the METEOR jar (or for Python's own line handling); any of them inside a
# report would desynchronise the stdin/stdout protocol, so they become spaces.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _meteor_safe(text: str) -> str:
    # "|||" is METEOR's field separator: removed, as pycocoevalcap does for hypotheses (we also do it for references).
    return _LINE_BREAKS.sub(" ", text).replace("|||", "")


class _MeteorProcess:
    """The METEOR 1.5 jar in ``-stdio`` mode, spoken to exactly as pycocoevalcap's ``Meteor`` does.

    Our own wrapper (not pycocoevalcap's class) so that a missing Java, a crashed JVM or a sanitising problem
    gives a clear error instead of a hang, and stderr cannot fill a pipe.
    """

    def __init__(self) -> None:
        _require_java("METEOR")
        meteor_dir = _pycocoevalcap_dir("meteor")
        self._stderr = tempfile.TemporaryFile()
        # Same command line as pycocoevalcap.meteor.Meteor, so the scores are the same.
        self._proc = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        self._lock = threading.Lock()

    def _ask(self, line: str) -> None:
        self._proc.stdin.write((line + "\n").encode())
        self._proc.stdin.flush()

    def _read(self) -> str:
        out = self._proc.stdout.readline()
        if not out:
            self._stderr.seek(0)
            err = " ".join(self._stderr.read().decode(errors="replace").split())[-2000:]
            raise UserError(f"the METEOR java process stopped unexpectedly: {err or '(no message)'}")
        return out.decode().strip()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def corpus_score(self, gts: dict, res: dict, stats_out: list | None = None) -> tuple[float, list[float]]:
        """pycocoevalcap's ``Meteor.compute_score``: one SCORE line per segment, then one EVAL over all stats.

        ``stats_out``, when given, receives each segment's sufficient-statistics line (23 numbers, see
        ``clinicalblip.metrics.casestats.meteor_from_stats``) in segment order.
        """
        with self._lock:
            try:
                stats = []
                for key in gts:
                    hyp = _meteor_safe(res[key][0]).replace("  ", " ")
                    refs = [_meteor_safe(r) for r in gts[key]]
                    self._ask(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)))
                    stats.append(self._read())
                if stats_out is not None:
                    stats_out.extend(stats)
                self._ask("EVAL ||| " + " ||| ".join(stats))
                per_segment = [float(self._read()) for _ in stats]
                return float(self._read()), per_segment
            except (ValueError, OSError) as exc:
                # out of step with the jar: end it so the next call starts a fresh one
                self.close()
                raise UserError(f"METEOR failed: {exc}") from exc
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._stderr.closed:
            return
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


_METEOR: _MeteorProcess | None = None
_METEOR_LOCK = threading.Lock()


def _meteor() -> _MeteorProcess:
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or not _METEOR.alive():
            _METEOR = _MeteorProcess()
        return _METEOR


@atexit.register
def close_meteor() -> None:
    """Stop the shared METEOR java process (a later call starts a new one)."""
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is not None:
            _METEOR.close()
            _METEOR = None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer`` on a list of texts (same jar, flags and punctuation filter).

    Our own call so the temporary file goes to the system temp dir (the package dir may be read-only) and an empty
    last line cannot shift the alignment.
    """
    _require_java("the PTB tokenizer (protocol coco-ptb)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = os.path.join(_pycocoevalcap_dir("tokenizer"), STANFORD_CORENLP_3_4_1_JAR)
    lines = [(t or "").replace("\n", " ") for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as fh:
            fh.write("\n".join(lines).encode())
        proc = subprocess.run(
            ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        raise UserError(f"the PTB tokenizer failed: {' '.join(proc.stderr.decode(errors='replace').split())[-2000:]}")
    out = proc.stdout.decode().split("\n")
    out += [""] * max(0, len(lines) - len(out))
    punct = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in out[: len(lines)]]


# ---------------------------------------------------------------------------------------------- scoring
def tokenize_for_protocol(texts: Sequence[str], protocol: str) -> list[str]:
    """The text each scorer sees under ``protocol``."""
    if protocol == "r2gen":
        return [clean_report_r2gen(t, "iu_xray") for t in texts]
    if protocol == "r2gen-mimic":
        return [clean_report_r2gen(t, "mimic_cxr") for t in texts]
    if protocol == "coco-ptb":
        return ptb_tokenize(texts)
    raise UserError(f"unknown NLG protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def _as_texts(values: Iterable, what: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise UserError(f"{what}[{i}] is {type(v).__name__}, expected a string")
        out.append(v)
    return out


def compute_nlg(
    references: Sequence[str],
    predictions: Sequence[str],
    protocol: str = "r2gen",
    skip: Iterable[str] = (),
) -> dict:
    """BLEU_1..BLEU_4, METEOR, ROUGE_L, CIDEr (floats), ``protocol`` and ``n`` for paired reports.

    One reference per prediction. ``skip`` names metrics not to compute (e.g. ``("METEOR",)`` on a machine without
    Java); they come back as ``None`` and are listed under ``skipped``. Empty predictions score 0, never crash.
    """
    return nlg_with_case_stats(references, predictions, protocol, skip)[0]


def nlg_with_case_stats(
    references: Sequence[str],
    predictions: Sequence[str],
    protocol: str = "r2gen",
    skip: Iterable[str] = (),
) -> tuple[dict, dict]:
    """``compute_nlg``'s dict plus the per-case sufficient statistics of each metric (same scorer calls).

    The second dict holds ``tokens_ref`` / ``tokens_pred`` (what the scorers saw), ``bleu_comps`` (per case:
    the pycocoevalcap BleuScorer's cooked ``correct[4]``, ``guess[4]``, ``testlen``, ``reflen``), ``meteor_stats``
    (the METEOR jar's 23-number SCORE line per case), ``rouge_l`` and ``cider`` (per-case scores, CIDEr-D with
    document frequencies from this reference set); a skipped metric's entry is absent.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = _as_texts(references, "references")
    preds = _as_texts(predictions, "predictions")
    if len(refs) != len(preds):
        raise UserError(f"{len(refs)} references but {len(preds)} predictions: they must pair up one to one")
    if not refs:
        raise UserError("no reports to score (empty input)")
    skip = {s.upper() if s.upper() != "CIDER" else "CIDEr" for s in skip}
    unknown = skip - set(METRIC_KEYS) - {"BLEU"}
    if unknown:
        raise UserError(f"cannot skip unknown metric(s) {sorted(unknown)}; known: {', '.join(METRIC_KEYS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown NLG protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if "METEOR" not in skip:
        _require_java("METEOR")

    tokens = tokenize_for_protocol(refs + preds, protocol)
    gts = {i: [tokens[i]] for i in range(len(refs))}
    res = {i: [tokens[len(refs) + i]] for i in range(len(refs))}

    out: dict = {}
    case: dict = {"tokens_ref": tokens[: len(refs)], "tokens_pred": tokens[len(refs):]}
    if skip & {"BLEU", "BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"}:
        out.update({k: None for k in METRIC_KEYS[:4]})
    else:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU_{i + 1}": float(b) for i, b in enumerate(bleu)})
        case["bleu_comps"] = _bleu_comps(gts, res)
    if "METEOR" in skip:
        out["METEOR"] = None
    else:
        lines: list[str] = []
        out["METEOR"] = _meteor().corpus_score(gts, res, stats_out=lines)[0]
        case["meteor_stats"] = lines
    if "ROUGE_L" in skip:
        out["ROUGE_L"] = None
    else:
        rouge, rouge_cases = Rouge().compute_score(gts, res)
        out["ROUGE_L"] = float(rouge)
        case["rouge_l"] = [float(x) for x in rouge_cases]
    if "CIDEr" in skip:
        out["CIDEr"] = None
    else:
        cider, cider_cases = Cider().compute_score(gts, res)
        out["CIDEr"] = float(cider)
        case["cider"] = [float(x) for x in cider_cases]
    out["protocol"] = protocol
    out["n"] = len(refs)
    skipped = [k for k in METRIC_KEYS if out[k] is None]
    if skipped:
        out["skipped"] = skipped
    return out, case


def _bleu_comps(gts: dict, res: dict) -> list[list[int]]:
    """Per case ``correct[1..4] + guess[1..4] + [testlen, reflen]``, cooked by pycocoevalcap's own BleuScorer.

    Corpus BLEU is a function of the sums of these (with one reference, the 'closest' reference length is that
    reference's length), so resampling cases means resampling these rows.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    rows = []
    for key in gts:
        scorer = BleuScorer(n=4)
        scorer += (res[key][0], gts[key])
        comps = scorer.ctest[0]
        reflen = min((abs(rl - comps["testlen"]), rl) for rl in scorer.crefs[0][0])[1]
        rows.append([*comps["correct"], *comps["guess"], comps["testlen"], reflen])
    return rows
