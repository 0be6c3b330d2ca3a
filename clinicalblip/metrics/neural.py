"""Neural report metrics from a local weights folder (see ``weights``): CheXbert, SembScore, BERTScore, RadCliQ-v1.

Written on the project's transformers from the published definitions; nothing is downloaded here.

- **CheXbert** (Smit et al. 2020): bert-base-uncased + 14 linear heads on the [CLS] state (13 heads with 4 classes
  blank / positive / negative / uncertain, No Finding with 2). Checkpoint keys: ``module.bert.*`` and
  ``module.linear_heads.{0..13}.*`` under ``model_state_dict``.
- **SembScore** (Yu et al. 2023, CXR-Report-Metric): cosine similarity of the CheXbert [CLS] embeddings of the
  reference and the generated report, per report, then the mean.
- **BERTScore** (Zhang et al. 2020): greedy cosine matching of contextual token embeddings from one hidden layer;
  P over the candidate's tokens, R over the reference's, F = 2PR/(P+R); with IDF off every token weighs 1 except
  the [CLS]/[SEP] (<s>/</s>) tokens, which weigh 0; rescaled as (x - b) / (1 - b) with bert_score's baseline b.
  ReXrank / RadCliQ: distilroberta-base, layer 5 (hidden_states[5]), rescaled, IDF off. RadEval: distilbert-base-
  uncased, layer 5, rescaled.
- **RadCliQ-v1** (Yu et al. 2023): a linear model on standardised per-report [RadGraph (ent+rel)/2, BERTScore,
  SembScore, BLEU-2]; lower is better; ReXrank shows 1 / mean(RadCliQ-v1).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from clinicalblip.errors import UserError

# bert_score 0.3.13, bert_score/rescale_baseline/en/distilbert-base-uncased.tsv, row LAYER=5 (P, R, F).
DISTILBERT_L5_BASELINE = (0.6666034, 0.66660464, 0.66620487)
# bert_score's rescale baseline of distilroberta-base (ReXrank / RadCliQ BERTScore), every row (LAYER: (P, R, F)), from
# https://github.com/Tiiiger/bert_score/blob/b795b3d0000c087e4129ebba34635064b3a0a30c/bert_score/rescale_baseline/en/distilroberta-base.tsv
# (unchanged since that commit through master 19e7f55; the file's sha256 is DISTILROBERTA_BASELINE_TSV_SHA256, the same
# bytes RadEval vendors). Layer 5 is the one bert_score uses for distilroberta-base (model2layers).
DISTILROBERTA_BASELINE = {
    0: (0.42608285, 0.4272089, 0.42462298), 1: (0.7367886, 0.7370362, 0.736573),
    2: (0.79922664, 0.799593, 0.7991632), 3: (0.8329021, 0.8333321, 0.83291864),
    4: (0.8442, 0.84462386, 0.84425896), 5: (0.84732, 0.84759504, 0.8473319),
    6: (0.89334005, 0.8935088, 0.8933471),
}
DISTILROBERTA_L5_BASELINE = DISTILROBERTA_BASELINE[5]
DISTILROBERTA_BASELINE_TSV_SHA256 = "208d5b2547bc41a1dbfb110f665c4ce38f0b90f7ce1d5c5fa30a25a4d779e1b4"
# RadCliQ-v1: StandardScaler mean / scale and linear coefficients for [radgraph, bertscore, semb_score, bleu_score]
# + intercept, from CXR-Report-Metric's CXRMetric/radcliq-v1.pkl (rajpurkarlab, commit 9c9ecad) as transcribed in
# RadEval (jbdel/RadEval, RadEval/factual/RadCliQv1/radcliq.py).
RADCLIQ_V1_MEAN = (0.53792312, 0.61757256, 0.76479421, 0.44738335)
RADCLIQ_V1_SCALE = (0.30282584, 0.22430938, 0.25394391, 0.29892717)
RADCLIQ_V1_COEF = (-3.77083683e-01, -3.70300100e-01, -2.52616218e-01, 4.31504841e-12)
RADCLIQ_V1_INTERCEPT = 2.46655256e-10

# CheXbert's head order (the CheXpert column order with No Finding last) and class -> label value.
CHEXBERT_HEADS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
    "No Finding",
)
CHEXBERT_CLASS_VALUE = (None, 1, 0, -1)


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------------------------------------ CheXbert
def build_chexbert(config):
    """The CheXbert module for a BertConfig: ``bert`` + ``linear_heads`` (13 x 4 classes, 1 x 2)."""
    torch = _torch()
    from transformers import BertModel

    class CheXbert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)
            hidden = config.hidden_size
            self.linear_heads = torch.nn.ModuleList(
                [torch.nn.Linear(hidden, 4) for _ in range(13)] + [torch.nn.Linear(hidden, 2)])

        def cls(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

        def forward(self, input_ids, attention_mask):
            c = self.cls(input_ids, attention_mask)
            return [head(c) for head in self.linear_heads]

    return CheXbert()


def load_state_checked(model, state: dict, source: Path, ignore=("position_ids",)) -> None:
    """Load ``state`` into ``model`` strictly; mismatched keys or shapes are a UserError that names them."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(k.endswith(i) for i in ignore) or k in own}
    missing = [k for k in own if k not in state and not any(k.endswith(i) for i in ignore)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}")
        raise UserError(f"{source}: the checkpoint does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


class CheXbert:
    """CheXbert labels and [CLS] embeddings from ``chexbert.pth`` + a bert-base-uncased folder (config + vocab)."""

    def __init__(self, weights: str | Path, bert_dir: str | Path, device: str = "cpu", batch_size: int = 16):
        self.weights, self.bert_dir = Path(weights), Path(bert_dir)
        for p in (self.weights, self.bert_dir / "config.json", self.bert_dir / "vocab.txt"):
            if not p.is_file():
                raise UserError(f"CheXbert needs {p}, which is missing")
        self.device, self.batch_size = device, batch_size
        torch = _torch()
        from transformers import BertConfig, BertTokenizerFast

        config = BertConfig.from_json_file(str(self.bert_dir / "config.json"))
        self.model = build_chexbert(config)
        try:
            ckpt = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{self.weights}: not a loadable CheXbert checkpoint ({exc})") from exc
        state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{self.weights}: expected a dict with 'model_state_dict'")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        load_state_checked(self.model, state, self.weights)
        self.model.eval().to(device)
        self.tok = BertTokenizerFast(vocab_file=str(self.bert_dir / "vocab.txt"), do_lower_case=True)
        self.max_length = min(512, int(config.max_position_embeddings))

    def _batches(self, texts: Sequence[str]):
        torch = _torch()
        for i in range(0, len(texts), self.batch_size):
            batch = [" ".join((t or "").split()) for t in texts[i: i + self.batch_size]]
            enc = self.tok(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                yield batch, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def label(self, texts: Sequence[str]) -> list[dict]:
        from clinicalblip.metrics.labeler import OBSERVATIONS

        out = []
        for batch, ids, mask in self._batches(texts):
            classes = [lg.argmax(-1).tolist() for lg in self.model(ids, mask)]
            for j in range(len(batch)):
                row = {o: None for o in OBSERVATIONS}
                for h, obs in enumerate(CHEXBERT_HEADS):
                    row[obs] = CHEXBERT_CLASS_VALUE[classes[h][j]]
                out.append(row)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = [self.model.cls(ids, mask).float().cpu().numpy() for _, ids, mask in self._batches(texts)]
        return np.concatenate(rows) if rows else np.zeros((0, self.model.bert.config.hidden_size))


def sembscore(ref_emb: np.ndarray, pred_emb: np.ndarray) -> np.ndarray:
    """Per-report cosine similarity of two (n, d) embedding matrices (0 where either is all zeros)."""
    dot = (ref_emb * pred_emb).sum(1)
    norm = np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(pred_emb, axis=1)
    return np.where(norm > 0, dot / np.where(norm > 0, norm, 1), 0.0)


# ------------------------------------------------------------------------------------------------ BERTScore
def baseline_tsv(table: dict[int, tuple[float, float, float]] | None = None) -> str:
    """A baseline table in bert_score's TSV layout (``LAYER,P,R,F``), byte-identical to the published file."""
    table = DISTILROBERTA_BASELINE if table is None else table
    return "LAYER,P,R,F\n" + "".join(f"{k},{p!r},{r!r},{f!r}\n" for k, (p, r, f) in sorted(table.items()))


def read_baseline(path: Path, layer: int) -> tuple[float, float, float]:
    """(P, R, F) baseline of ``layer`` from a bert_score rescale_baseline TSV (header LAYER,P,R,F)."""
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.strip().split(",")
        if len(parts) >= 4 and parts[0].strip() == str(layer):
            return float(parts[1]), float(parts[2]), float(parts[3])
    raise UserError(f"{path}: no baseline row for layer {layer}")


class BERTScorer:
    """BERTScore with one local encoder folder (config + safetensors + tokenizer files)."""

    def __init__(self, model_dir: str | Path, layer: int = 5, baseline: tuple[float, float, float] | None = None,
                 device: str = "cpu", batch_size: int = 32):
        torch = _torch()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise UserError(f"BERTScore needs {self.dir / 'config.json'}, which is missing")
        config = AutoConfig.from_pretrained(str(self.dir), local_files_only=True)
        kw = {"add_prefix_space": True} if config.model_type in ("roberta", "gpt2") else {}
        self.tok = AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True, **kw)
        self.model = AutoModel.from_pretrained(str(self.dir), local_files_only=True, use_safetensors=True)
        self.model.eval().to(device)
        n_layers = getattr(config, "num_hidden_layers", getattr(config, "n_layers", None))
        if n_layers is not None and layer > n_layers:
            raise UserError(f"{self.dir}: BERTScore layer {layer} but the model has {n_layers} layers")
        self.layer, self.baseline, self.device, self.batch_size = layer, baseline, device, batch_size
        self.max_length = min(512, int(getattr(config, "max_position_embeddings", 512)) - 2)
        self._special = {i for i in (self.tok.cls_token_id, self.tok.sep_token_id, self.tok.bos_token_id,
                                     self.tok.eos_token_id) if i is not None}
        self._torch = torch

    def _embed(self, texts: Sequence[str]):
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = [(t or "").strip() for t in texts[i: i + self.batch_size]]
            enc = self.tok(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hs = self.model(input_ids=enc["input_ids"].to(self.device),
                                attention_mask=enc["attention_mask"].to(self.device),
                                output_hidden_states=True).hidden_states[self.layer]
            hs = torch.nn.functional.normalize(hs.float(), dim=-1).cpu()
            for j in range(len(batch)):
                m = enc["attention_mask"][j].bool()
                ids = enc["input_ids"][j][m]
                w = torch.tensor([0.0 if int(t) in self._special else 1.0 for t in ids])
                out.append((hs[j][m], w))
        return out

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        """Per-pair P, R, F (rescaled when a baseline is set)."""
        if len(candidates) != len(references):
            raise ValueError("candidates and references differ in length")
        cand, ref = self._embed(candidates), self._embed(references)
        p, r = np.zeros(len(cand)), np.zeros(len(cand))
        for k, ((ce, cw), (re_, rw)) in enumerate(zip(cand, ref)):
            sim = ce @ re_.T
            p[k] = float((sim.max(1).values * cw).sum() / cw.sum().clamp_min(1e-12))
            r[k] = float((sim.max(0).values * rw).sum() / rw.sum().clamp_min(1e-12))
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
        if self.baseline is not None:
            bp, br, bf = self.baseline
            p, r, f = (p - bp) / (1 - bp), (r - br) / (1 - br), (f - bf) / (1 - bf)
        return {"precision": p, "recall": r, "f1": f}


# ------------------------------------------------------------------------------------------------ RadCliQ-v1
def sentence_bleu2(reference: str, candidate: str) -> float:
    """Sentence BLEU-2 on whitespace tokens (uniform 1/2 weights, brevity penalty, 0 when a precision is 0)."""
    ref, hyp = (reference or "").split(), (candidate or "").split()
    if not hyp or not ref:
        return 0.0
    logs = []
    for n in (1, 2):
        h = Counter(tuple(hyp[i: i + n]) for i in range(len(hyp) - n + 1))
        r = Counter(tuple(ref[i: i + n]) for i in range(len(ref) - n + 1))
        total = sum(h.values())
        match = sum(min(c, r[g]) for g, c in h.items())
        if total == 0 or match == 0:
            return 0.0
        logs.append(math.log(match / total))
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(sum(logs) / 2)


def radcliq_v1(radgraph: np.ndarray, bertscore: np.ndarray, semb: np.ndarray, bleu2: np.ndarray) -> np.ndarray:
    """Per-report RadCliQ-v1 (lower is better) from the four per-report component scores."""
    x = np.column_stack([radgraph, bertscore, semb, bleu2]).astype(float)
    z = (x - np.asarray(RADCLIQ_V1_MEAN)) / np.asarray(RADCLIQ_V1_SCALE)
    return z @ np.asarray(RADCLIQ_V1_COEF) + RADCLIQ_V1_INTERCEPT


def json_dump(obj) -> str:
    return json.dumps(obj, indent=2)
