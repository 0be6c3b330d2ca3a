"""Stand-in weights folders for the neural metrics: the official file names, layouts and parameter key names
(chexbert.pth's ``module.bert.*`` / ``module.linear_heads.*``, RadGraph's AllenNLP archive with ``config.json``,
``weights.th`` and ``vocabulary/``, the hub encoders' config / safetensors / tokenizer files), at tiny widths with
seeded random weights. Built in the test, never downloaded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

WORDS = ("the heart is normal in size lungs are clear no pleural effusion or pneumothorax mild cardiomegaly "
         "small left right basilar atelectasis consolidation pneumonia edema opacity stable calcified granuloma "
         "acute cardiopulmonary abnormality there with of and a to be seen lobe lower upper bilateral "
         "moderate large possible . , ( ) / : enlarged silhouette mediastinal unchanged").split()
CORPUS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis.",
    "Right lower lobe consolidation, possibly pneumonia. No pneumothorax.",
    "Stable calcified granuloma in the right upper lobe. No acute cardiopulmonary abnormality.",
]
NER_LABELS = ["", "ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA"]
REL_LABELS = ["modify", "located_at", "suggestive_of"]


def _bert_vocab() -> list[str]:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for w in WORDS:
        if w not in vocab:
            vocab.append(w)
    return vocab + ["##s", "##ed", "##ly"]


def _tiny_bert_config(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64, **kw)


def _write_bert_tokenizer(d: Path) -> int:
    d.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return len(vocab)


def write_chexbert(root: Path, seed: int = 0) -> None:
    from clinicalblip.metrics.neural import build_chexbert

    n = _write_bert_tokenizer(root / "bert-base-uncased")
    cfg = _tiny_bert_config(n)
    cfg.to_json_file(str(root / "bert-base-uncased" / "config.json"))
    torch.manual_seed(seed)
    model = build_chexbert(cfg)
    # The released file: a DataParallel state dict ("module." prefix) plus optimizer state and the epoch.
    ckpt = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]}}
    (root / "chexbert").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, root / "chexbert" / "chexbert.pth")


def write_distilroberta(root: Path, seed: int = 1) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel

    d = root / "distilroberta-base"
    d.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(d))
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, type_vocab_size=1)
    RobertaModel(cfg).save_pretrained(str(d))


def write_distilbert(root: Path, seed: int = 2) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    d = root / "distilbert-base-uncased"
    n = _write_bert_tokenizer(d)
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=n, dim=32, n_layers=6, n_heads=2, hidden_dim=37, max_position_embeddings=64)
    DistilBertModel(cfg).save_pretrained(str(d))


def radgraph_state(hidden: int = 32, feature: int = 8, width: int = 4, ff: int = 16, seed: int = 3,
                   ner_ns: str = "radgraph__ner_labels", rel_ns: str = "radgraph__relation_labels",
                   vocab_size: int | None = None) -> dict:
    """weights.th of a DyGIE archive, every key spelled as AllenNLP writes it (written out here on purpose)."""
    from transformers import BertModel

    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    bert = BertModel(_tiny_bert_config(vocab_size or len(_bert_vocab())))  # with its pooler, as archived
    state = {f"_embedder.token_embedder_bert._matched_embedder.transformer_model.{k}": v
             for k, v in bert.state_dict().items()}
    span = 2 * hidden + feature
    state["_endpoint_span_extractor._span_width_embedding.weight"] = r(width, feature)

    def ffnn(prefix, inp):
        state[f"{prefix}._linear_layers.0.weight"], state[f"{prefix}._linear_layers.0.bias"] = r(ff, inp), r(ff)
        state[f"{prefix}._linear_layers.1.weight"], state[f"{prefix}._linear_layers.1.bias"] = r(ff, ff), r(ff)

    ffnn(f"_ner._ner_scorers.{ner_ns}.0._module", span)
    state[f"_ner._ner_scorers.{ner_ns}.1._module.weight"] = r(len(NER_LABELS) - 1, ff)
    state[f"_ner._ner_scorers.{ner_ns}.1._module.bias"] = r(len(NER_LABELS) - 1) + 1.0
    ffnn(f"_relation._mention_pruners.{rel_ns}._scorer.0._module", span)
    state[f"_relation._mention_pruners.{rel_ns}._scorer.1._module.weight"] = r(1, ff)
    state[f"_relation._mention_pruners.{rel_ns}._scorer.1._module.bias"] = r(1)
    ffnn(f"_relation._relation_feedforwards.{rel_ns}", 3 * span)
    state[f"_relation._relation_scorers.{rel_ns}.weight"] = r(len(REL_LABELS), ff)
    state[f"_relation._relation_scorers.{rel_ns}.bias"] = r(len(REL_LABELS)) + 0.5
    # DyGIE builds its coref module even when its loss weight is 0: present in the archive, unused.
    state["_coref._antecedent_feedforward._module._linear_layers.0.weight"] = r(ff, 3 * span)
    return state


def radgraph_config(max_length: int = 16, width: int = 4) -> dict:
    emb = {"type": "pretrained_transformer_mismatched", "model_name": "tiny/stand-in-bert", "max_length": max_length}
    return {
        "dataset_reader": {"type": "dygie", "max_span_width": width, "token_indexers": {"bert": emb}},
        "model": {"type": "dygie", "embedder": {"token_embedders": {"bert": emb}}, "feature_size": 8,
                  "max_span_width": width, "target_task": "relation",
                  "feedforward_params": {"num_layers": 2, "hidden_dims": 16, "dropout": 0.4},
                  "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
                  "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0},
                              "ner": {}, "relation": {"spans_per_word": 0.5}, "events": {}}},
    }


def write_radgraph_archive(path: Path, state: dict | None = None, config: dict | None = None,
                           ner_ns: str = "radgraph__ner_labels", rel_ns: str = "radgraph__relation_labels") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = radgraph_state(ner_ns=ner_ns, rel_ns=rel_ns) if state is None else state
    files = {"config.json": json.dumps(config or radgraph_config()).encode(),
             f"vocabulary/{ner_ns}.txt": ("\n".join(NER_LABELS) + "\n").encode(),
             f"vocabulary/{rel_ns}.txt": ("\n".join(REL_LABELS) + "\n").encode(),
             "vocabulary/non_padded_namespaces.txt": b"*tags\n*labels\n"}
    buf = io.BytesIO()
    torch.save(state, buf)
    files["weights.th"] = buf.getvalue()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    enc = path.parent / (path.name.removesuffix(".tar.gz") + "-encoder")
    n = _write_bert_tokenizer(enc)
    _tiny_bert_config(n).to_json_file(str(enc / "config.json"))
    return path


def write_weights_dir(root: Path) -> Path:
    """Every file of ``weights.FILES`` as a stand-in, plus SHA256SUMS (as fetch writes it)."""
    from clinicalblip.metrics.weights import FILES, write_sums

    root.mkdir(parents=True, exist_ok=True)
    write_chexbert(root)
    write_distilroberta(root)
    write_distilbert(root)
    write_radgraph_archive(root / "radgraph" / "radgraph.tar.gz")
    write_radgraph_archive(root / "radgraph" / "radgraph-xl.tar.gz", state=radgraph_state(
        seed=4, ner_ns="radgraph-xl__ner_labels", rel_ns="radgraph-xl__relation_labels"),
        ner_ns="radgraph-xl__ner_labels", rel_ns="radgraph-xl__relation_labels")
    missing = [f.path for f in FILES if not (root / f.path).is_file()]
    assert not missing, missing
    write_sums(root, [f.path for f in FILES])
    return root
