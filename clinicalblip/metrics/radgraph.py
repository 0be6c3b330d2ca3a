"""RadGraph F1: the entity / relation graph of a report (Jain et al. 2021) and the rewards papers report.

Inference re-implements the published DyGIE++ span model (Wadden et al. 2019) that the ``radgraph`` package ships
as AllenNLP archives (``radgraph.tar.gz``, ``radgraph-xl.tar.gz``: ``config.json``, ``weights.th``,
``vocabulary/``), on the project's transformers:

1. the report is split into word tokens (``radgraph``: a space around / , : . ! ? ( ); ``radgraph-xl``: word /
   punctuation runs) and treated as one sentence;
2. each word's vector is the mean of its word pieces' last-layer BERT states (AllenNLP's "mismatched" embedder;
   inputs longer than the encoder's window are folded into windows, each with its own [CLS] / [SEP]);
3. every span of at most ``max_span_width`` words is the concatenation of its first and last word vectors and a
   learned span-width embedding;
4. NER: a feed-forward network + linear layer per span, a fixed 0 logit for "no entity" prepended, argmax;
5. relations: a mention scorer keeps the ``ceil(n_words * spans_per_word)`` best spans (in text order); every
   ordered pair (i, j) gets FFNN([s_i, s_j, s_i * s_j]) -> linear + mention scores of i and j, a fixed 0 logit for
   "no relation" prepended, argmax.

Rewards (the ``radgraph`` package's ``rewards.py``, current version, tokens lower-cased; an empty side scores 0):

- ``simple`` (RG_E): F1 of the sets {(tokens, label)} of the two reports' entities;
- ``partial`` (RG_ER, what most papers call RadGraph F1): entities with a relation become (tokens, label, True);
- ``complete`` (RG_ER-bar): an entity with relations contributes one (tokens, label, relation, target tokens)
  element per relation instead of itself;
- RadCliQ / ReXrank's ``(entity F1 + relation F1) / 2`` with entity = (tokens, label) and relation =
  ((tokens, label), (target tokens, target label), relation type) (CXR-Report-Metric).

Parameter names, checked against the published package (github.com/Stanford-AIMI/radgraph @ 87f11a1, v0.1.18 code:
``radgraph/radgraph.py`` builds ``dygie.DyGIE`` and loads ``weights.th`` with ``strict=True``): the embedder is
``_embedder.token_embedder_bert._matched_embedder.transformer_model`` (BasicTextFieldEmbedder names a token embedder
``token_embedder_<key>``; PretrainedTransformerMismatchedEmbedder keeps a ``_matched_embedder`` whose
``transformer_model`` is the full AutoModel, pooler included); ``_endpoint_span_extractor._span_width_embedding``
(combination "x,y", ``num_width_embeddings=max_span_width``, ``span_width_embedding_dim=feature_size``);
``_ner._ner_scorers[<ns>]`` = Sequential(TimeDistributed(FeedForward), TimeDistributed(Linear(.., n_labels - 1)))
(FeedForward's ``_linear_layers``, ReLU); ``_relation._mention_pruners[<ns>]._scorer`` (same Sequential, 1 output),
``_relation._relation_feedforwards[<ns>]`` (input 3 x span dim: [s_i, s_j, s_i * s_j]) and
``_relation._relation_scorers[<ns>]`` (Linear to the relation vocabulary size; mention scores of both spans added, a
0 dummy logit prepended). Pruned spans are re-sorted into text order (``entity_beam_pruner.py``). The archive layout
(``config.json``, ``weights.th``, ``vocabulary/<ns>.txt``) is what the package extracts and reads. No mismatch found.

An annotation is the package's dict: ``{"entities": {"1": {"tokens", "label", "start_ix", "end_ix",
"relations": [[type, target_id], ...]}, ...}}``.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from pathlib import Path
from typing import Mapping, Sequence

from clinicalblip.errors import UserError

REWARD_LEVELS = ("simple", "partial", "complete")


# ------------------------------------------------------------------------------------------------ rewards
def _set_f1(hyp: set, ref: set) -> float:
    p = sum(1 for x in hyp if x in ref) / len(hyp) if hyp else 0.0
    r = sum(1 for x in ref if x in hyp) / len(ref) if ref else 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _elements(ann: Mapping, level: str) -> set:
    ents = ann.get("entities", {})
    out = set()
    for e in ents.values():
        tokens, label, rels = e["tokens"].lower(), e["label"], e.get("relations") or []
        if level == "simple" or not rels:
            out.add((tokens, label))
        elif level == "partial":
            out.add((tokens, label, True))
        else:
            for rel_type, target in rels:
                out.add((tokens, label, rel_type, ents[str(target)]["tokens"].lower()))
    return out


def reward(hyp: Mapping, ref: Mapping, level: str) -> float:
    """The radgraph package's reward of ``hyp`` against ``ref`` at ``level`` (simple / partial / complete)."""
    if level not in REWARD_LEVELS:
        raise ValueError(f"level must be one of {REWARD_LEVELS}, got {level!r}")
    if not hyp.get("entities") or not ref.get("entities"):
        return 0.0
    return _set_f1(_elements(hyp, level), _elements(ref, level))


def entity_relation_f1(hyp: Mapping, ref: Mapping) -> tuple[float, float]:
    """(entity F1, relation F1) as RadCliQ / ReXrank compute them (0 for an empty side)."""
    def ents(a):
        return {(e["tokens"], e["label"]) for e in a.get("entities", {}).values()}

    def rels(a):
        es = a.get("entities", {})
        out = set()
        for e in es.values():
            for rel_type, target in e.get("relations") or []:
                t = es.get(str(target))
                if t is not None:
                    out.add(((e["tokens"], e["label"]), (t["tokens"], t["label"]), rel_type))
        return out

    return _set_f1(ents(hyp), ents(ref)), _set_f1(rels(hyp), rels(ref))


def radgraph_scores(hyps: Sequence[Mapping], refs: Sequence[Mapping]) -> dict[str, list[float]]:
    """Per-report rewards at the three levels and RadCliQ's (entity + relation) / 2."""
    out: dict[str, list[float]] = {"simple": [], "partial": [], "complete": [], "entity_relation": []}
    for h, r in zip(hyps, refs):
        for level in REWARD_LEVELS:
            out[level].append(reward(h, r, level))
        e, rel = entity_relation_f1(h, r)
        out["entity_relation"].append((e + rel) / 2)
    return out


# ------------------------------------------------------------------------------------------------ tokenization
_RADGRAPH_PUNCT = "/,:.!?()"


def words(text: str, model_type: str) -> list[str]:
    """The word tokens the model sees: ``radgraph`` splits off / , : . ! ? ( ) ; ``radgraph-xl`` word/punct runs."""
    text = text or "None"  # the package scores an empty report as the text "None"
    if model_type == "radgraph":
        cls = re.escape(_RADGRAPH_PUNCT)
        return re.sub(rf"(?<! )(?=[{cls}])|(?<=[{cls}])(?! )", " ", text).split()
    text = re.sub(r"\s+", " ", text.replace("\n", " "))
    toks = " ".join(re.findall(r"\w+|[^\w\s]+", text))
    for a, b in ((").", ") ."), ("%.", "% ."), (".'", ". '"), ("%,", "% ,"), ("%)", "% )")):
        toks = toks.replace(a, b)
    return toks.split()


# ------------------------------------------------------------------------------------------------ the model
def _read_archive(path: Path) -> tuple[dict, dict, dict[str, list[str]]]:
    """(config, state_dict, vocabulary namespaces) from an AllenNLP archive (.tar.gz) or an extracted folder."""
    import torch

    files: dict[str, bytes] = {}
    if path.is_dir():
        for f in path.rglob("*"):
            if f.is_file():
                files[f.relative_to(path).as_posix()] = f.read_bytes()
    else:
        try:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar.getmembers():
                    if m.isfile():  # never extracted to disk: no path traversal
                        files[m.name.removeprefix("./")] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as exc:
            raise UserError(f"{path}: not a readable RadGraph archive ({exc})") from exc
    for need in ("config.json", "weights.th"):
        if need not in files:
            raise UserError(f"{path}: the archive has no {need}")
    config = json.loads(files["config.json"])
    state = torch.load(io.BytesIO(files["weights.th"]), map_location="cpu", weights_only=True)
    vocab = {}
    for name, data in files.items():
        if name.startswith("vocabulary/") and name.endswith(".txt") and not name.endswith("non_padded_namespaces.txt"):
            vocab[name[len("vocabulary/"):-4]] = data.decode("utf-8").split("\n")
    return config, state, vocab


def _namespace_labels(vocab: dict[str, list[str]], suffix: str, path: Path) -> tuple[str, list[str]]:
    names = [n for n in vocab if n.endswith(suffix)]
    if len(names) != 1:
        raise UserError(f"{path}: expected one vocabulary namespace ending in {suffix}, found {names}")
    lines = vocab[names[0]]
    while lines and lines[-1] == "":
        lines = lines[:-1]
    return names[0], lines


def _get(d: Mapping, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return default
        d = d[part]
    return d


class RadGraph:
    """A RadGraph / RadGraph-XL archive loaded for inference. ``annotate(texts)`` -> the package's annotations."""

    def __init__(self, archive: str | Path, encoder_dir: str | Path, model_type: str = "radgraph",
                 device: str = "cpu"):
        import torch
        from transformers import BertConfig, BertModel, BertTokenizerFast

        self.path, self.model_type, self.device = Path(archive), model_type, device
        config, state, vocab = _read_archive(self.path)
        enc = Path(encoder_dir)
        for need in ("config.json", "vocab.txt"):
            if not (enc / need).is_file():
                raise UserError(f"RadGraph ({self.path.name}) needs its encoder's {enc / need}, which is missing; "
                                f"`clinicalblip metrics fetch --to DIR` downloads it")
        m = config.get("model", {})
        lw = m.get("loss_weights", {})
        coref_prop = _get(m, "modules.coref.coref_prop", 0) or 0
        if lw.get("coref", 0) or lw.get("events", 0) or coref_prop:
            raise UserError(f"{self.path}: coref / event modules are switched on in this archive; only the NER + "
                            "relation model of RadGraph is supported")
        self.max_span_width = int(m.get("max_span_width", _get(config, "dataset_reader.max_span_width", 8)))
        feature_size = int(m["feature_size"])
        ff = m.get("feedforward_params", {})
        self.spans_per_word = float(_get(m, "modules.relation.spans_per_word", 0.5))
        self.max_length = _get(m, "embedder.token_embedders.bert.max_length") or 512
        self.ner_ns, self.ner_labels = _namespace_labels(vocab, "ner_labels", self.path)
        self.rel_ns, self.rel_labels = _namespace_labels(vocab, "relation_labels", self.path)
        if self.ner_labels and self.ner_labels[0] != "":
            raise UserError(f"{self.path}: the NER vocabulary must start with the empty null label")

        nn = torch.nn
        bert_cfg = BertConfig.from_json_file(str(enc / "config.json"))
        hidden = bert_cfg.hidden_size
        span_dim = 2 * hidden + feature_size

        def feedforward(input_dim):
            dims = ff["hidden_dims"]
            dims = [dims] * int(ff["num_layers"]) if isinstance(dims, int) else list(dims)
            layers = nn.ModuleList()
            for d in dims:
                layers.append(nn.Linear(input_dim, d))
                input_dim = d
            holder = nn.Module()
            holder._linear_layers = layers  # AllenNLP FeedForward's parameter names
            holder.out_dim = input_dim
            return holder

        def scorer(n_out):
            # Sequential(TimeDistributed(FeedForward), TimeDistributed(Linear)): keys "0._module.*", "1._module.*"
            f = feedforward(span_dim)
            first, second = nn.Module(), nn.Module()
            first._module, second._module = f, nn.Linear(f.out_dim, n_out)
            return nn.Sequential(first, second)

        root = nn.Module()
        root._embedder = nn.Module()
        root._embedder.token_embedder_bert = nn.Module()
        root._embedder.token_embedder_bert._matched_embedder = nn.Module()
        root._embedder.token_embedder_bert._matched_embedder.transformer_model = BertModel(bert_cfg,
                                                                                          add_pooling_layer=False)
        root._endpoint_span_extractor = nn.Module()
        root._endpoint_span_extractor._span_width_embedding = nn.Embedding(self.max_span_width, feature_size)
        root._ner = nn.Module()
        root._ner._ner_scorers = nn.ModuleDict({self.ner_ns: scorer(len(self.ner_labels) - 1)})
        root._relation = nn.Module()
        pruner = nn.Module()
        pruner._scorer = scorer(1)
        root._relation._mention_pruners = nn.ModuleDict({self.rel_ns: pruner})
        rel_ff = feedforward(3 * span_dim)
        root._relation._relation_feedforwards = nn.ModuleDict({self.rel_ns: rel_ff})
        root._relation._relation_scorers = nn.ModuleDict({self.rel_ns: nn.Linear(rel_ff.out_dim,
                                                                                 len(self.rel_labels))})
        # The archive also holds the (unused, switched-off) coref / event modules and BERT's pooler: not loaded.
        skip = ("_coref.", "_events.", "_matched_embedder.transformer_model.pooler.")
        kept = {k: v for k, v in state.items() if not any(s in k or k.startswith(s) for s in skip)}
        from clinicalblip.metrics.neural import load_state_checked

        load_state_checked(root, kept, self.path)
        self.net = root.eval().to(device)
        self.bert = root._embedder.token_embedder_bert._matched_embedder.transformer_model
        self.tok = BertTokenizerFast(vocab_file=str(enc / "vocab.txt"), do_lower_case=True)
        self._torch = torch

    # -- the forward pass, one report at a time (the package uses batch size 1 as well)
    def _word_vectors(self, ws: list[str]):
        torch = self._torch
        pieces, offsets = [], []
        for w in ws:
            ids = self.tok(w, add_special_tokens=False)["input_ids"]
            offsets.append((len(pieces), len(pieces) + len(ids)) if ids else None)
            pieces.extend(ids)
        window = int(self.max_length) - 2
        states = []
        for s in range(0, max(len(pieces), 1), window):
            chunk = [self.tok.cls_token_id] + pieces[s: s + window] + [self.tok.sep_token_id]
            with torch.no_grad():
                h = self.bert(input_ids=torch.tensor([chunk], device=self.device)).last_hidden_state[0]
            states.append(h[1:-1])
        h = torch.cat(states) if states else torch.zeros(0, self.bert.config.hidden_size)
        zero = torch.zeros(self.bert.config.hidden_size, device=self.device)
        # a word with no word piece (the tokenizer drops it) gets a zero vector, as in AllenNLP
        return torch.stack([h[o[0]:o[1]].mean(0) if o is not None else zero for o in offsets])

    def _run(self, text: str) -> tuple[list[str], list[tuple[int, int, str]], list[tuple[int, int, int, int, str]]]:
        torch = self._torch
        ws = words(text, self.model_type)
        n = len(ws)
        spans = [(i, j) for i in range(n) for j in range(i, min(i + self.max_span_width, n))]
        with torch.no_grad():
            wv = self._word_vectors(ws)
            idx = torch.tensor(spans, device=self.device)
            width = self.net._endpoint_span_extractor._span_width_embedding(idx[:, 1] - idx[:, 0])
            emb = torch.cat([wv[idx[:, 0]], wv[idx[:, 1]], width], -1)
            ner = self._score(self.net._ner._ner_scorers[self.ner_ns], emb)
            ner = torch.cat([ner.new_zeros(len(spans), 1), ner], -1).argmax(-1).tolist()
            entities = [(spans[k][0], spans[k][1], self.ner_labels[c]) for k, c in enumerate(ner) if c != 0]
            keep = min(len(spans), max(1, math.ceil(n * self.spans_per_word)))
            mention = self._score(self.net._relation._mention_pruners[self.rel_ns]._scorer, emb).squeeze(-1)
            top = torch.sort(mention.topk(keep).indices).values
            te, ts = emb[top], mention[top]
            k = len(top)
            pair = torch.cat([te.unsqueeze(1).expand(k, k, -1), te.unsqueeze(0).expand(k, k, -1),
                              te.unsqueeze(1) * te.unsqueeze(0)], -1)
            f = self.net._relation._relation_feedforwards[self.rel_ns]
            x = pair.reshape(k * k, -1)
            for lin in f._linear_layers:
                x = torch.relu(lin(x))
            rs = self.net._relation._relation_scorers[self.rel_ns](x).reshape(k, k, -1)
            rs = rs + ts.view(k, 1, 1) + ts.view(1, k, 1)
            rel = torch.cat([rs.new_zeros(k, k, 1), rs], -1).argmax(-1) - 1
        top = top.tolist()
        relations = [(spans[top[i]][0], spans[top[i]][1], spans[top[j]][0], spans[top[j]][1],
                      self.rel_labels[int(rel[i, j])]) for i in range(k) for j in range(k) if rel[i, j] >= 0]
        return ws, entities, relations

    def _score(self, seq, x):
        torch = self._torch
        for lin in seq[0]._module._linear_layers:
            x = torch.relu(lin(x))
        return seq[1]._module(x)

    def annotate(self, texts: Sequence[str]) -> list[dict]:
        """One annotation dict per text, in the package's format (entities numbered from "1")."""
        out = []
        for text in texts:
            ws, ents, rels = self._run(text)
            index = {(s, e): str(i + 1) for i, (s, e, _) in enumerate(ents)}
            entities = {}
            for i, (s, e, label) in enumerate(ents):
                links = [[lab, index[(s2, e2)]] for (s1, e1, s2, e2, lab) in rels
                         if (s1, e1) == (s, e) and (s2, e2) in index]
                entities[str(i + 1)] = {"tokens": " ".join(ws[s: e + 1]), "label": label, "start_ix": s,
                                        "end_ix": e, "relations": links}
            out.append({"text": " ".join(ws), "entities": entities})
        return out


def encoder_dir_for(archive: Path) -> Path:
    """Where the weights folder keeps the encoder (config + vocab) an archive names: ``<archive stem>-encoder/``."""
    return archive.parent / (archive.name.removesuffix(".tar.gz") + "-encoder")
