"""Shape-true presets: random-weight InstructBLIPs with the exact shapes of the real Salesforce checkpoints.

`shape-vicuna7b` and `shape-flant5xl` have the widths, vocabulary sizes, query count, image size, special-token
ids and module names of Salesforce/instructblip-vicuna-7b and Salesforce/instructblip-flan-t5-xl (their hub
config.json / tokenizer files as refreshed for transformers >= 4.47). LoRA targets, trainable counts, prompt
lengths after query expansion and merges are then proven at the real widths without a download.
`model.layers: N` keeps N layers in every tower (vision, Q-Former, LLM; T5 encoder and decoder), which makes
them small enough for a CPU; 0 keeps the real depth.

The tokenizers are built in code with the real tokenizer classes, ids and sizes:
- Vicuna: LLaMA sentencepiece-style BPE (``▁`` word boundary, byte fallback ``<0x00>``..``<0xFF>`` at ids
  3..258), 32000 pieces, then ``[PAD]`` 32000, ``<image>`` 32001, ``<video>`` 32002. BOS is prepended; as in
  LAVIS and the hub tokenizer, BOS, EOS and UNK are all ``</s>`` (id 2). The embedding table has 32064 rows.
- Flan-T5: sentencepiece-style unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, 32000 pieces,
  ``<extra_id_99>``..``<extra_id_0>`` at 32000..32099, ``<image>`` 32100, ``<video>`` 32101; EOS appended,
  no BOS; 32128 embedding rows.
- Q-Former: bert-base-uncased-style WordPiece ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103),
  30522 pieces, then ``[DEC]`` 30522 as its BOS; 30523 rows.
Which pieces exist is learned from built-in radiology text plus the training corpus; the rest of each
vocabulary is reserved pieces that no text produces, so that every id and size matches the real one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections import Counter

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertTokenizer,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaTokenizer,
    T5Tokenizer,
)

from clinicalblip.tiny import BUILTIN_TEXT, BlipImageProcessor

SHAPE_PRESETS = ("shape-vicuna7b", "shape-flant5xl")

# EVA ViT-g/14 at 224 px and the BERT-base Q-Former: identical in both checkpoints.
VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
              # The hub config keeps HF's 1e-10 (the weights were loaded, never initialised); random weights
              # that small would make the vision tower a constant.
              initializer_range=0.02)
QFORMER = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
               max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0)
LLAMA = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
             max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=10000.0,
             tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
             # The hub text_config says bos 0 / eos 1 (a LAVIS leftover that no token uses); these are the ids
             # the tokenizer really emits, so generation stops where the real one does.
             bos_token_id=2, eos_token_id=2, pad_token_id=32000)
T5 = dict(model_type="t5", vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
          num_decoder_layers=24, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
          relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

PRESETS = {
    "shape-vicuna7b": {"hub_id": "Salesforce/instructblip-vicuna-7b", "text": LLAMA, "image_token_id": 32001},
    "shape-flant5xl": {"hub_id": "Salesforce/instructblip-flan-t5-xl", "text": T5, "image_token_id": 32100},
}
NUM_QUERY_TOKENS = 32
LLAMA_PIECES = 32000  # sentencepiece model size; [PAD], <image>, <video> follow
T5_PIECES = 32000  # sentencepiece model size; 100 sentinels, <image>, <video> follow
BERT_PIECES = 30522  # bert-base-uncased; [DEC] follows
IMAGE, VIDEO = "<image>", "<video>"


def is_shape(base: str) -> bool:
    return base in SHAPE_PRESETS


def _check(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown shape preset {preset!r} (known: {', '.join(SHAPE_PRESETS)})")
    return PRESETS[preset]


def _texts(corpus: list[str] | None) -> list[str]:
    return [line for line in BUILTIN_TEXT.strip().splitlines()] + list(corpus or [])


def _reserved(vocab_len: int, size: int) -> list[str]:
    # Pieces no text produces (BPE only builds pieces through merges; no unigram input holds these strings
    # unless it types them): they fill the vocabulary up to the real size.
    return [f"<reserved_{i}>" for i in range(size - vocab_len)]


def _llama_tokenizer(texts: list[str]) -> LlamaTokenizer:
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    budget = LLAMA_PIECES - 256  # byte-fallback pieces take 256 ids
    trainer_tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=budget, special_tokens=specials,
                                                               show_progress=False))
    state = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(((i, p) for p, i in state["vocab"].items() if p not in specials), key=lambda t: t[0])
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for _, p in learned if p not in set(pieces)][: LLAMA_PIECES - len(pieces)]
    kept = set(pieces)
    merges = []
    for m in state["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            merges.append((a, b))
    pieces += _reserved(len(pieces), LLAMA_PIECES)
    tok = LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, bos_token="</s>",
                         eos_token="</s>", unk_token="</s>", add_bos_token=True, add_eos_token=False,
                         legacy=False, model_max_length=2048)
    tok.add_special_tokens({"pad_token": "[PAD]"})  # 32000
    tok.add_tokens([IMAGE, VIDEO], special_tokens=True)  # 32001, 32002
    return tok


def _t5_tokenizer(texts: list[str]) -> T5Tokenizer:
    """Unigram pieces scored by log frequency: whole words (``▁word``), then punctuation and characters.

    Built directly rather than with tokenizers' UnigramTrainer, which keeps only a few hundred sub-word
    pieces on a small corpus (every word split into 3-5 pieces, far from how T5 encodes report text).
    """
    specials = ["<pad>", "</s>", "<unk>"]
    counts: Counter = Counter()
    for text in texts:
        for chunk in text.split():
            parts = re.findall(r"\w+|[^\w\s]", chunk)
            counts.update(["▁" + parts[0]] + parts[1:] if parts else [])
            counts.update(c for c in chunk)  # every character also alone: any seen text encodes
            counts["▁" + chunk[0]] += 1
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: T5_PIECES - len(specials) - 1]
    vocab = [(p, 0.0) for p in specials] + [("▁", math.log(0.5))]
    vocab += [(p, math.log(n / total) - (3.0 if len(p.lstrip("▁")) == 1 else 0.0)) for p, n in ranked
              if p != "▁" and p not in specials]
    floor = min(s for _, s in vocab) - 10.0
    vocab += [(p, floor) for p in _reserved(len(vocab), T5_PIECES)]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]  # extra_id_0 = 32099, as in T5
    tok = T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)
    tok.add_tokens([IMAGE, VIDEO], special_tokens=True)  # 32100, 32101
    return tok


def _qformer_tokenizer(texts: list[str]) -> BertTokenizer:
    """bert-base-uncased layout: [PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, pieces."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    pieces = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    pieces += chars + ["##" + c for c in chars]
    seen = set(pieces)
    # Most frequent words first, ties alphabetical: the same vocabulary in every process.
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(pieces) >= BERT_PIECES:
            break
        if word not in seen:
            pieces.append(word)
            seen.add(word)
    pieces += [f"[unused{99 + i}]" for i in range(BERT_PIECES - len(pieces))]
    tok = BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, model_max_length=512)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # 30522, as LAVIS adds it
    return tok


def build_shape_processor(preset: str, corpus: list[str] | None = None) -> InstructBlipProcessor:
    """The processor of a shape preset: LLM + Q-Former tokenizers built in code, 224 px BLIP images, 32 queries."""
    spec = _check(preset)
    texts = _texts(corpus)
    tok = _llama_tokenizer(texts) if spec["text"]["model_type"] == "llama" else _t5_tokenizer(texts)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if image_id != spec["image_token_id"]:  # pragma: no cover - a broken build, not a user error
        raise AssertionError(f"{preset}: <image> got id {image_id}, the real tokenizer has {spec['image_token_id']}")
    size = VISION["image_size"]
    image_processor = BlipImageProcessor(size={"height": size, "width": size}, do_resize=True, do_rescale=True,
                                         do_normalize=True, do_convert_rgb=True)
    return InstructBlipProcessor(image_processor=image_processor, tokenizer=tok,
                                 qformer_tokenizer=_qformer_tokenizer(texts), num_query_tokens=NUM_QUERY_TOKENS)


def shape_config(preset: str, layers: int = 0) -> InstructBlipConfig:
    """The InstructBlipConfig of a preset; layers > 0 keeps that many layers in every tower."""
    spec = _check(preset)
    vision, qformer, text = dict(VISION), dict(QFORMER), dict(spec["text"])
    if layers:
        vision["num_hidden_layers"] = qformer["num_hidden_layers"] = layers
        if text["model_type"] == "t5":
            text["num_layers"] = text["num_decoder_layers"] = layers
        else:
            text["num_hidden_layers"] = layers
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=NUM_QUERY_TOKENS, image_token_index=spec["image_token_id"])


def build_shape_model(preset: str, layers: int = 0, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device | None = None) -> InstructBlipForConditionalGeneration:
    """Random weights in a preset's shapes, built directly in `dtype` on `device` (a 7B on the GPU in seconds)."""
    config = shape_config(preset, layers)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = InstructBlipForConditionalGeneration(config)
            with torch.no_grad():
                # HF starts query tokens at zero; a small random start breaks the symmetry between queries.
                model.query_tokens.normal_(0.0, 0.02)
                if config.text_config.model_type == "t5":
                    # HF draws an untied T5 lm_head with std 1.0: logits of std ~45 and a loss near 1400.
                    # d_model ** -0.5 gives the usual ~ln(vocab) start, as a trained head would.
                    model.language_model.lm_head.weight.normal_(0.0, config.text_config.d_model ** -0.5)
    finally:
        torch.set_default_dtype(previous)
    text = config.text_config
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    if getattr(text, "bos_token_id", None) is not None and text.model_type != "t5":
        model.generation_config.bos_token_id = text.bos_token_id
    return model


@contextlib.contextmanager
def _no_zero3():
    """Let a throw-away meta model be built inside a ZeRO-3 run (transformers would wrap it in zero.Init)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def full_depth_counts(config: InstructBlipConfig, base: str, cfg) -> dict:
    """Trainable and total parameters of this stage's policy on the full-depth model.

    `config` is the loaded model's config, `base` the chain's base name: for a shape preset the real depth
    replaces any `model.layers` cut. The model is built on the meta device (no memory, no init), so this
    costs about a second even for 7B.
    """
    from clinicalblip.policy import apply_trainable

    full = shape_config(base) if is_shape(base) else copy.deepcopy(config)
    cfg = copy.deepcopy(cfg)
    cfg.lora.init = "default"  # no weight values on meta
    with _no_zero3(), torch.device("meta"):
        model = InstructBlipForConditionalGeneration(full)
        model, report = apply_trainable(model, cfg)
    total = report["total"]["trainable"] + report["total"]["frozen"]
    return {"trainable": report["total"]["trainable"], "total": total, "layers_cut": is_shape(base)}


def full_depth_line(model, base: str, cfg) -> str:
    """One header line: trainable / total parameters at full depth (the real model, even when layers are cut)."""
    from clinicalblip.policy import core_model

    try:
        c = full_depth_counts(core_model(model).config, base, cfg)
    except Exception as exc:  # a header line must never stop a run
        return f"full depth: parameter count unavailable ({type(exc).__name__}: {exc})"
    return (f"full depth: {c['trainable']:,} trainable / {c['total']:,} total parameters "
            f"({100.0 * c['trainable'] / max(c['total'], 1):.2f}%)")
