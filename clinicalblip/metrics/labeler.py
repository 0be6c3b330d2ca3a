"""Report labelers: the 14 CheXpert observations (1 positive, 0 negative, -1 uncertain, None not mentioned).

``ChexpertRuleLabeler`` is a rule-based labeler in the spirit of the CheXpert labeler (Irvin et al. 2019,
https://github.com/stanfordmlgroup/chexpert-labeler, MIT licence): mention phrases per observation, negation and
uncertainty cues found around each mention, and CheXpert's aggregation (positive > uncertain > negative; No Finding
= 1 only when no other observation except Support Devices is positive or uncertain, and — as CheXpert's
``no_finding`` phrase list does — no other abnormality such as a granuloma or scoliosis is reported). The phrase
and cue lists below are our own, written as regular expressions (CheXpert's public lists were consulted, not
copied), and all are compiled once at import so thousands of reports label in about a second.

Hedges differ in strength: "likely", "probable", "suggestive of", "presumably", "favored" state a finding the
radiologist believes present and count as positive (expert-labelled OpenI reports read them so; CheXpert's own
labeler calls them uncertain); "may", "possible", "questionable", "cannot exclude" stay uncertain. A differential
without such a modal ("atelectasis or scarring", "atelectasis versus infiltrate") names an opacity that is there and
its readings: each alternative counts as a positive mention, as the expert annotators of OpenI read it (CheXpert
calls it uncertain).

Labelers share a tiny interface (``Labeler``): a ``name`` and ``label(texts) -> list[dict]``. ``CheXbertLabeler``
runs CheXbert when the user has its weights on disk; it is never used unless asked for and never falls back.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from clinicalblip.jsonl import iter_json_objects
from clinicalblip.errors import UserError

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
COMMON_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
# Internal name for mentions of abnormalities outside the 14 (they only veto No Finding).
_OTHER = "_other"


@runtime_checkable
class Labeler(Protocol):
    """Anything that turns report texts into per-observation labels."""

    name: str

    def label(self, texts: Sequence[str]) -> list[dict[str, int | None]]:
        """One dict per text with every name in OBSERVATIONS mapped to 1, 0, -1 or None (not mentioned)."""
        ...


# ---------------------------------------------------------------------------------------------- phrases
# Words allowed between an organ and its abnormal adjective ("the heart is mildly enlarged"): copulas, adverbs,
# negators (the negation check sees them) and hedges. A closed list, so "heart size normal and large effusion"
# cannot join across unrelated words.
_GAP = (r"(?:\s+(?:is|are|was|were|be|been|appears?|seems?|remains?|again|still|now|also|not|no|slightly|mildly|"
        r"moderately|markedly|severely|significantly|minimally|mild|moderate|marked|severe|borderline|stably|stable|"
        r"grossly|somewhat|very|quite|persistently|chronically|xxxx|likely|probably|possibly|may|might|to|at|least|"
        r"top|globally|diffusely|massively|progressively|more|less|further|increasingly|overall|in|size|unchanged|"
        r"and|prominently|enlarged)){0,5}")

_HEART = r"(?:heart|cardiac (?:silhouette|shadow|contour|size|outline)|heart (?:size|shadow|silhouette))"
_MEDIASTINUM = r"(?:cardiomediastinal|cardio-mediastinal|mediastinal|mediastinum|superior mediastinum)"

# (observation, pattern, fixed value): fixed None = decided by context, UNCERTAIN = hedged by the phrase itself,
# NEGATIVE = an explicit normal statement ("normal heart size").
_PHRASES: list[tuple[str, str, int | None]] = [
    # --- Cardiomegaly
    ("Cardiomegaly", r"cardiomegaly|cardiac enlargement|cardiomyopathy", None),
    ("Cardiomegaly", r"(?<!non)(?<!non-)(?:enlarge(?:d|ment of)|increase(?:d| in)(?: size of)?)(?: the)?(?: size of the)? "
                     + _HEART, None),
    ("Cardiomegaly", r"(?:large|enlarged|prominent|increased) (?:heart|cardiac silhouette|cardiac size|heart size)", None),
    ("Cardiomegaly", _HEART + _GAP + r"\s+(?<!non)(?:enlarged|enlargement|increased|large|prominent)\b", None),
    ("Cardiomegaly", r"borderline (?:heart|cardiac|enlarged heart|cardiomegaly)", UNCERTAIN),
    ("Cardiomegaly", r"(?:heart|cardiac)(?: size| silhouette)?(?: is)? borderline|"
                     r"(?:heart|cardiac)\b[^.;\x00]{0,50}?\bborderline (?:enlarged|enlargement|large|increased)", UNCERTAIN),
    ("Cardiomegaly", r"(?:normal|nl) (?:heart|cardiac) (?:size|silhouette|contour)s?|"
                     r"(?:heart|cardiac silhouette|heart size|cardiac size)(?: is| are| appears?| remains?)?"
                     r" (?:normal|within normal limits|unremarkable)", NEGATIVE),
    # --- Enlarged Cardiomediastinum (an enlarged cardiomediastinal silhouette also makes Cardiomegaly uncertain)
    ("Enlarged Cardiomediastinum", r"(?<!non)(?<!non-)(?:widen(?:ed|ing)|enlarged|prominent|enlargement of the) " + _MEDIASTINUM
                                   + r"|" + _MEDIASTINUM + r" (?:widening|enlargement|prominence)", None),
    ("Enlarged Cardiomediastinum", _MEDIASTINUM + r"(?: silhouette| contours?| width| shadow)?" + _GAP
                                   + r"\s+(?:widened|enlarged|prominent|wide)\b", None),
    ("Cardiomegaly", r"(?:cardiomediastinal|cardio-mediastinal) (?:silhouette|contour|shadow)s?" + _GAP
                     + r"\s+enlarged\b|(?<!non)(?<!non-)enlarged cardiomediastinal", UNCERTAIN),
    ("Enlarged Cardiomediastinum", _MEDIASTINUM + r" (?:silhouette|contours?)(?: is| are| appears?)?"
                                   r" (?:normal|within normal limits|unremarkable)|normal " + _MEDIASTINUM, NEGATIVE),
    # --- Pleural Effusion
    ("Pleural Effusion", r"(?<!pericardial )(?<!joint )(?<!knee )effusions?\b|pleural fluid|hydrothorax|hydropneumothorax|"
                         r"fluid (?:in|within|tracking along) the (?:\w+ )?(?:fissure|pleural space)", None),
    # --- Pneumothorax
    ("Pneumothorax", r"(?:hydro|hemo|hydro-|hemo-)?pneumothora(?:x|ces)|\bptx\b|pleural air\b|air in the pleural space",
     None),
    # --- Atelectasis
    ("Atelectasis", r"atelecta\w*|(?<!vertebral )(?<!body )(?<!compression )collapsed?\b", None),
    # --- Edema (congestion alone is not called edema)
    ("Edema", r"(?<!soft tissue )(?<!extremity )edema|kerley", None),
    # --- Consolidation
    ("Consolidation", r"(?<!non)(?<!non-)consolidat\w*", None),
    # --- Pneumonia
    ("Pneumonia", r"pneumonias?\b|bronchopneumonia|pneumonitis|"
                  r"(?<!urinary tract )(?<!granulomatous )(?<!tuberculous )(?<!tuberculosis )(?<!histoplasmosis )"
                  r"(?<!fungal )infection|infectious|"
                  r"\binfective", None),
    # --- Lung Opacity
    ("Lung Opacity", r"opaci(?:ty|ties|fication|fied)|infiltrat\w*|(?<!bone )(?<!soft tissue )(?<!calcified )densit(?:y|ies)|"
                     r"air ?space (?:disease|process|filling)|ground[- ]glass|haziness|hazy|"
                     r"interstitial (?:opacit\w+|disease|process|infiltrat\w*)", None),
    # --- Lung Lesion
    ("Lung Lesion", r"(?:micro|fibro|reticulo|reticulo-)?nodul(?:e|es|ar|arity)\b|\bmass(?:es|like|-like)?\b|"
                    r"(?<!skin )(?<!bony )(?<!bone )(?<!osseous )(?<!rib )(?<!lytic )(?<!lucent )(?<!sclerotic )lesions?\b|"
                    r"tumou?rs?\b|neoplasm|carcinoma|malignan\w+|cavitary|cavitation|\blump", None),
    # --- Pleural Other
    ("Pleural Other", r"pleural (?:thickening|scar\w*|plaques?|calcification)|pleural[- ]parenchymal scar\w*|"
                      r"pleuro-?parenchymal scar\w*|fibrothorax|fissur\w* thickening|thicken\w* (?:of )?(?:the )?(?:\w+ )?fissures?|"
                      r"(?:apical|biapical) (?:pleural )?(?:cap|capping|thickening)", None),
    # --- Fracture
    ("Fracture", r"fractur\w*|\bfx\b", None),
    # --- Support Devices
    ("Support Devices", r"pacemaker|pacer|defibrillator|\ba?icd\b|(?:picc|central|venous|port|dialysis|subclavian|"
                        r"jugular|swan[- ]ganz|arterial) (?:line|catheter)|catheters?\b|\bpicc\b|"
                        r"(?:endotracheal|tracheostomy|nasogastric|orogastric|feeding|enteric|chest|et|ng|og|"
                        r"dobhoff|gastrostomy) tubes?|\btubes?\b|port-?a-?cath|portacath|mediport|infusion port|"
                        r"(?:sternotomy|cerclage) wires?|\bwires?\b|\bleads?\b|stents?\b|prosthe\w+|"
                        r"valve (?:replacement|prosthesis)|hardware|ivc filter|\bdrains?\b|shunt|"
                        r"electrodes?|\bdevices?\b|loop recorder|\bcoils?\b|\bscrews?\b|\bplates?\b|"
                        r"arthroplast\w*|\bstimulator", None),
    # --- other abnormalities: not among the 14, but a report that has them is not "No Finding"
    (_OTHER, r"emphysema\w*|\bcopd\b|chronic obstructive|obstructive (?:pulmonary|lung) disease|hyperinflat\w*|"
             r"hyperexpan\w*|hyperaerat\w*|overinflat\w*|hyperlucen\w*|bullae|bullous|blebs?\b|"
             r"flatten\w* (?:of )?(?:the )?(?:hemi)?diaphragm\w*|blunt\w*|(?:levo|dextro|rotoscolio|kypho)?scolio\w*|"
             r"(?:hyper)?kypho\w*|(?:hyper)?lordo\w*|degenerat\w*|"
             r"spondylo\w*|osteophyt\w*|(?:osteo|spondyl)?arthrit\w*|(?:osteo)?arthropath\w*|osteopeni\w*|osteoporo\w*|"
             r"demineraliz\w*|"
             r"(?:micro)?calcifi\w*|calcinosis|granulom\w*|hernia\w*|eventration|elevat\w+ (?:of )?(?:the )?(?:\w+ )?"
             r"(?:hemi)?diaphragm|(?:hemi)?diaphragm\w* (?:is |are )?(?:\w+ )?elevat\w*|"
             r"(?<!pleural )thicken\w*|interstitial (?:markings|prominence|pattern|lung disease)|reticul\w*|"
             r"fibros\w*|fibrotic|scar(?:s|ring|red)?\b|cicatri\w*|atheroscler\w*|tortu\w*|ectatic|ectasia|"
             r"aneurysm\w*|unfold\w*|dilat\w* (?:of )?(?:the )?(?:aorta|aortic|pulmonary arter\w*)|"
             r"congesti\w*|cephaliz\w*|cuffing|bronchiect\w*|bronchitis|airways? disease|aspiration|hemorrhag\w*|"
             r"hematoma|contusion|metasta\w*|deformit\w*|(?:post|status post)[- ]?(?:surgical|operative|op)\b|"
             r"postoperative|postsurgical|sternotomy|thoracotomy|cabg|mastectomy|lobectomy|pneumonectomy|"
             r"cholecystectomy|surgical changes|cysts?\b|cystic|lymphadenopathy|adenopathy|"
             r"(?:enlarged|prominent) (?:\w+ )?(?:lymph nodes?|hil(?:um|a|ar))|hilar (?:prominence|enlargement)|"
             r"(?:low|decreased|reduced) lung volumes?|hypoinflat\w*|hypoventilat\w*|poor inspiration|"
             r"shallow inspiration|crowding|volume loss|pneumomediastinum|pneumoperitoneum|free air|"
             r"subcutaneous (?:air|emphysema)|foreign bod\w*|bullets?\b|shrapnel|radiopaque|sclero\w*|lytic|"
             r"(?:surgical|vascular|cholecystectomy) clips?|\bclips?\b|sutures?\b|suture material|staples|"
             r"jewelry|piercing|nipple rings?|\bfusion\b|spurs?\b|spurring|curvature|endplate|\bdish\b|"
             r"hyperostosis|osteodystroph\w*|interstitial changes|lipoma|soft tissue (?:density|mass|opacity)|"
             r"(?:lung|inspiratory) volumes? (?:is |are )?(?:\w+ )?(?:low|decreased|reduced|diminished)|"
             r"low[- ]volume|"
             r"(?:vertebral|compression) (?:body )?(?:collapse|deformit\w*|height loss)|loss of (?:vertebral )?height|"
             r"hyperdens\w*|lucenc\w*|pectus|asbestos|sarcoid\w*|tubercul\w*|\btb\b|(?:heart|cardiac) failure|"
             r"\bchf\b|pulmonary (?:arterial )?hypertension|inflammat\w*|air[- ]fluid|effacement|"
             r"prominen(?:t|ce) (?:of )?(?:the )?(?:pulmonary|vascul|interstiti|bronch|aort|hil)\w*|"
             r"(?:vascular|interstitial|bronchovascular|pulmonary) (?:\w+ )?prominen\w*|"
             r"(?:prominent|coarse|increased) (?:\w+ )?markings", None),
]

# Pseudo-negations: contain a negation word but do not negate the finding ("no change in the effusion").
_PSEUDO_NEG = re.compile(
    r"\bno (?:significant |appreciable |definite |interval |substantial |major |marked |other )?(?:interval )?"
    r"(?:change|increase|worsening|progression|improvement)\b|\bnot (?:significantly |substantially )?"
    r"(?:changed|increased|improved|only)\b|\bwithout (?:significant |interval )?(?:change|increase|progression)\b|"
    r"\bno longer\b(?= (?:large|small|moderate|enlarged))|\bnot well (?:seen|visualized)\b"
)
# Uncertainty phrased with a negation word: decided before negation ("cannot exclude pneumonia").
_UNC_BEFORE_NEG = re.compile(
    r"\b(?:cannot|can ?not|can't|could not|not able to|unable to|difficult to|hard to)(?: be)?(?: entirely| completely| totally| definitely| well)?"
    r" (?:exclude|excluded|rule out|ruled out|be excluded|be ruled out|differentiate|distinguish)|"
    r"\bnot (?:be )?(?:entirely |completely |totally |definitely )?(?:excluded|ruled out)\b|"
    r"\bno (?:definite |convincing )?evidence to (?:exclude|rule out)\b|\b(?:is |are )?not (?:entirely |definitely )?(?:clear|certain)\b"
)
_NEG_PRE = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|removal of|"
    r"rather than|instead of|never|neither|nor|none|lack of|"
    r"no evidence of|no sign of|no signs of|no findings? of|disappearance of|clearing of|"
    r"interval (?:resolution|clearing|removal) of)\b"
)
_NEG_POST = re.compile(
    r"^(?:\s+\S+){0,6}?\s*(?:\b(?:is|are|was|were|has|have|had)\s+)?(?:been\s+)?"
    r"(?:(?:not|no longer)\s+(?:\w+ly\s+)?(?:seen|identified|present|visualized|visible|evident|appreciated|noted|"
    r"demonstrated|detected|apparent|shown|seen|identifiable|suspected|definitely seen)|"
    r"(?:resolved|cleared|absent|removed|gone|unlikely|excluded|ruled out|negative)\b|none\b)"
)
_UNC_PRE = re.compile(
    r"\b(?:may|might|could|would|possibl[ey]|questionabl[ey]|question(?:ed)?|"
    r"suspicious|suspicion|suspect\w*|concern\w*|consider\w*|differential|ddx|borderline|equivocal|"
    r"indeterminate|worrisome|cannot|can ?not|uncertain|unclear|if|rule out|r/o|exclude|"
    r"not excluded|either|perhaps|potential(?:ly)?)\b"
)
_UNC_POST = re.compile(
    r"^(?:\s+\S+){0,4}?\s*(?:\b(?:is|are)\s+)?(?:possible|possibly|suspected|questioned|"
    r"not excluded|may|might|could|cannot be excluded|can not be excluded|"
    r"would be|of uncertain|uncertain|unclear|is suspected)\b|\?"
)
# The finding is the object of a look, not a statement about the patient ("evaluation for pneumothorax is limited").
_NOT_ASSERTED = re.compile(
    r"\b(?:evaluat\w*|assess\w*|examin\w*|screen\w*|search\w*|looking|look) (?:for|of) (?:\w+ ){0,3}$"
)
# A new scope starts after these: cues before them do not reach mentions after them.
_SCOPE_BREAK = re.compile(
    r"\b(?:but|however|although|though|whereas|except|aside from|apart from|other than|besides|"
    r"while|yet|there (?:is|are|has|have)|with|and (?:the|there)|now)\b|[:;]|"
    # a negated list ends with its verb: "no effusion is seen, left lung nodule"
    r"\b(?:seen|noted|identified|present|demonstrated|visualized|evident|appreciated)\s*,"
)

# A lesion of a bone is not a lung lesion: judged in a window around the Lung Lesion mention, within its sentence.
_BONE = r"(?:ribs?|osseous|bony|bone|vertebra\w*|spine|spinal|clavic\w*|scapul\w*|humer\w*|sternum|sternal)"
_BONE_AFTER = re.compile(r"\s*(?:\w+\s+)?(?:of|in|involving|within)\s+(?:the\s+)?(?:[\w-]+\s+){0,3}?" + _BONE + r"\b")
_BONE_BEFORE = re.compile(r"\b" + _BONE + r"\s+(?:[\w-]+\s+)?$")

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+|(?<=\.)(?=[a-z])|\s+(?=\d+\.\s)")

# Every phrase starts at a word boundary ("stent" must not match inside "consistent").
_COMPILED: list[tuple[str, re.Pattern, int | None]] = [(o, re.compile(r"\b(?:" + p + ")"), v) for o, p, v in _PHRASES]


def _normalize(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("\x00", " ")
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if s and s.strip()]


def _classify(sentence: str, start: int, end: int) -> int | None:
    """Negated (0), uncertain (-1), positive (1), or None (not asserted) for the mention at sentence[start:end]."""
    if _NOT_ASSERTED.search(sentence, max(0, start - 60), start):
        return None
    # The scope before the mention (its last clause) plus the mention's own words (they may hold "not").
    before = sentence[:start]
    scope = 0
    for m in _SCOPE_BREAK.finditer(before):
        scope = m.end()
    pre = before[scope:] + " " + sentence[start:end]
    pre = _PSEUDO_NEG.sub(" ", pre)
    after = sentence[end:]
    cut = _SCOPE_BREAK.search(after)
    post = after[: cut.start()] if cut else after
    post = _PSEUDO_NEG.sub(" ", post)
    if _UNC_BEFORE_NEG.search(pre) or _UNC_BEFORE_NEG.search(post[:60]):
        return UNCERTAIN
    if _NEG_PRE.search(pre) or _NEG_POST.search(post):
        return NEGATIVE
    if _UNC_PRE.search(pre) or _UNC_POST.search(post):
        return UNCERTAIN
    return POSITIVE


def _aggregate(values: list[int]) -> int:
    # CheXpert: any positive wins, then uncertain, then negative.
    if POSITIVE in values:
        return POSITIVE
    if UNCERTAIN in values:
        return UNCERTAIN
    return NEGATIVE


def label_report(text: str | None) -> dict[str, int | None]:
    """Label one report; every observation of OBSERVATIONS maps to 1, 0, -1 or None."""
    found: dict[str, list[int]] = {}
    sentences = _sentences(_normalize(text or ""))
    # Scan the whole report once per phrase (much faster than once per sentence); sentences are joined with NUL,
    # which no phrase can match across, and each match is then judged inside its own sentence.
    joined = "\x00".join(sentences)
    starts, pos = [], 0
    for sentence in sentences:
        starts.append(pos)
        pos += len(sentence) + 1
    for obs, pattern, fixed in _COMPILED:
        for m in pattern.finditer(joined):
            if fixed == NEGATIVE:
                value = NEGATIVE
            else:
                k = bisect.bisect_right(starts, m.start()) - 1
                sentence, offset = sentences[k], starts[k]
                value = _classify(sentence, m.start() - offset, m.end() - offset)
                if value is None:
                    continue
                if obs == "Lung Lesion":
                    lo, hi = m.start() - offset, m.end() - offset
                    if _BONE_AFTER.match(sentence, hi) or _BONE_BEFORE.search(sentence, max(0, lo - 30), lo):
                        continue
                if fixed == UNCERTAIN and value == POSITIVE:
                    value = UNCERTAIN
            found.setdefault(obs, []).append(value)
    out: dict[str, int | None] = {o: None for o in OBSERVATIONS}
    for obs, values in found.items():
        if obs in out:
            out[obs] = _aggregate(values)
    blocked = any(v in (POSITIVE, UNCERTAIN) for o, v in out.items() if o not in ("No Finding", "Support Devices"))
    blocked = blocked or any(v != NEGATIVE for v in found.get(_OTHER, []))
    # As in CheXpert, a report with no finding at all (even an empty one) is No Finding.
    out["No Finding"] = None if blocked else POSITIVE
    return out


class ChexpertRuleLabeler:
    """Rule-based CheXpert-style labeler (see module docstring). No model, no download."""

    name = "chexpert-rules"

    def label(self, texts: Sequence[str]) -> list[dict[str, int | None]]:
        return [label_report(t) for t in texts]


class CheXbertLabeler:
    """CheXbert (Smit et al. 2020) from a local checkpoint: a BERT-base encoder with 14 linear heads.

    Needs ``weights`` (the released ``chexbert.pth``) and ``tokenizer`` (a local ``bert-base-uncased`` folder);
    both must exist on disk — nothing is downloaded and there is no fallback to the rule labeler.
    """

    name = "chexbert"
    def __init__(self, weights: str | Path | None = None, tokenizer: str | Path | None = None,
                 device: str = "cpu", batch_size: int = 16) -> None:
        if not weights:
            raise UserError(
                "the chexbert labeler needs its weights on disk: pass --chexbert-weights PATH/chexbert.pth "
                "(and --chexbert-tokenizer DIR, a local bert-base-uncased folder); nothing is downloaded. "
                "Use --labeler chexpert for the built-in rule labeler."
            )
        self.weights = Path(weights)
        if not self.weights.is_file():
            raise UserError(f"chexbert weights not found: {self.weights}")
        if not tokenizer or not Path(tokenizer).is_dir():
            raise UserError(
                f"chexbert needs a local bert-base-uncased tokenizer folder (--chexbert-tokenizer DIR); got {tokenizer!r}"
            )
        self.tokenizer_dir = Path(tokenizer)
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def _load(self):
        # One CheXbert implementation (metrics/neural.py): weights_only loading, keys checked by name.
        from clinicalblip.metrics.neural import CheXbert

        self._model = CheXbert(self.weights, self.tokenizer_dir, device=self.device, batch_size=self.batch_size)

    def label(self, texts: Sequence[str]) -> list[dict[str, int | None]]:
        if self._model is None:
            self._load()
        return self._model.label(texts)


def get_labeler(name: str = "chexpert", **options) -> Labeler:
    """``chexpert`` (rules, built in) or ``chexbert`` (needs ``weights=`` and ``tokenizer=`` on disk)."""
    if name in ("chexpert", "chexpert-rules", "rules"):
        return ChexpertRuleLabeler()
    if name == "chexbert":
        return CheXbertLabeler(**options)
    raise UserError(f"unknown labeler {name!r}; choose chexpert (built-in rules) or chexbert (local weights)")


# ---------------------------------------------------------------------------------------------- files
def read_texts(path: str | Path, field: str | None = None) -> list[tuple[str, str]]:
    """(id, text) pairs from JSONL with ``id`` + ``text``, or a predictions file (its ``prediction`` field).

    ``field`` picks another text field (e.g. ``reference``). Provenance lines (with a ``_provenance`` key) are
    skipped. Raises UserError naming the line on bad input.
    """

    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    pairs: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, rec in iter_json_objects(fh, path):
            if "_provenance" in rec:
                continue
            for key in (field,) if field else ("text", "prediction", "report"):
                if key in rec:
                    text = rec[key]
                    break
            else:
                raise UserError(f"{path}:{lineno}: no {repr(field) if field else repr('text') + ' (or prediction)'} field")
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: '{key}' must be a string")
            rid = rec.get("id", lineno)
            pairs.append((str(rid), text or ""))
    if not pairs:
        raise UserError(f"{path}: no records")
    return pairs


def write_labels_csv(path: str | Path, ids: Iterable[str], labels: Iterable[dict]) -> Path:
    """CSV with ``id`` then the 14 observations; values 1 / 0 / -1, empty when not mentioned."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("id",) + OBSERVATIONS)
        for rid, row in zip(ids, labels):
            writer.writerow([rid] + ["" if row.get(o) is None else int(row[o]) for o in OBSERVATIONS])
    return path


def label_file(input_path: str | Path, out_path: str | Path, labeler: Labeler | None = None,
               field: str | None = None) -> dict:
    """Label every record of ``input_path`` into ``out_path`` (CSV); returns counts per observation."""
    labeler = labeler or ChexpertRuleLabeler()
    pairs = read_texts(input_path, field)
    labels = labeler.label([t for _, t in pairs])
    write_labels_csv(out_path, [i for i, _ in pairs], labels)
    counts = {o: {"1": 0, "0": 0, "-1": 0} for o in OBSERVATIONS}
    for row in labels:
        for o in OBSERVATIONS:
            if row[o] is not None:
                counts[o][str(row[o])] += 1
    return {"n": len(pairs), "labeler": labeler.name, "out": str(out_path), "counts": counts}
