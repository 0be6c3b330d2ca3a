"""The built-in tiny preset: tokenizers trained in code must be the same in every process."""

import json
import subprocess
import sys

from clinicalblip.tiny import build_tiny_processor

_VOCABS = """
import json, sys
from clinicalblip.tiny import build_tiny_processor
corpus = json.load(sys.stdin)
p = build_tiny_processor("tiny", corpus=corpus)
print(json.dumps([p.tokenizer.get_vocab(), p.qformer_tokenizer.get_vocab()], sort_keys=True))
"""

CORPUS = [
    "The heart is mildly enlarged. Small left pleural effusion. No pneumothorax.",
    "Heart size is normal. A 1.5 cm nodule projects over the right upper lung. No focal consolidation.",
    "Dyspnea and leg swelling. Evaluate for pneumonia. Status post fall, rib pain.",
] * 5


def test_tokenizers_are_identical_across_processes():
    # Hash-map order differs between processes; a vocabulary that depended on it would give every training
    # run a different tokenizer (and different results from the same data and seed).
    outs = [
        subprocess.run([sys.executable, "-c", _VOCABS], input=json.dumps(CORPUS), capture_output=True, text=True,
                       check=True).stdout
        for _ in range(3)
    ]
    assert outs[0] == outs[1] == outs[2]
    llm, qformer = json.loads(outs[0])
    assert "pneumothorax" in qformer and "effusion" in qformer


def test_qformer_tokenizer_encodes_unseen_words_without_unk():
    q = build_tiny_processor("tiny", corpus=CORPUS).qformer_tokenizer
    ids = q("Xylophone-shaped 12mm opacity; cardiomegaly?")["input_ids"]
    assert q.unk_token_id not in ids
    assert q.decode(ids, skip_special_tokens=True).replace(" ", "") == "xylophone-shaped12mmopacity;cardiomegaly?"
    # corpus words are single pieces
    assert q.convert_ids_to_tokens(q("effusion nodule")["input_ids"])[1:-1] == ["effusion", "nodule"]
