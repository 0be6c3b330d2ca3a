"""`clinicalblip train --print-config`: the resolved stage config as YAML, one comment per key.

The comments are the ones written beside (or just above) each field in config.py, so the printed help and the
code cannot drift apart; KEY_HELP fills in the few fields config.py leaves uncommented. Imports nothing of the
project but config.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

import yaml

from clinicalblip import config as C

# Fields whose meaning config.py does not comment (the obvious ones there, not to a new user), or comments
# too long for one line.
KEY_HELP = {
    "model.base": "tiny | tiny-t5 | shape-vicuna7b | shape-flant5xl | a checkpoint folder | a hub id (ignored "
                  "with a parent)",
    "data.context_dropout": "fraction of training prompts without the indication (generation without one "
                            "stays in distribution)",
    "data.check_images": "image check before training: header (cheap, default) | decode | exists | none",
    "data.image_cache": "a `data cache` folder to read pixels from (empty: the raw images)",
    "data.jpeg_draft": "decode JPEGs (and JPEG 2000 DICOMs) at the smallest scale still >= the model's input",
    "train.select_best": "write the stage from the weights with the lowest val loss, not the last ones",
    "name": "the stage's name (stage.json, the run header, trackers)",
    "output_dir": "the stage folder to write (checkpoints/ and metrics.jsonl live beside the stage files)",
    "model.trust_remote_code": "never needed for InstructBLIP; refused code from the hub is safer",
    "model.gradient_checkpointing": "recompute activations in the backward pass: less memory, ~30% slower",
    "data.manifest": "manifest.jsonl to train on (data prepare / data synth write one)",
    "data.train_split": "the manifest split to train on",
    "data.val_split": "the manifest split for validation loss (and val_generate)",
    "data.template": "prompt template: a name in prompts/ or a path to a .yaml",
    "data.max_report_tokens": "report tokens trained on (and generation's default max_new_tokens)",
    "data.max_views": "views per study the model sees (frontal first); more are left out",
    "trainable.vision_model": "frozen | lora | full",
    "trainable.qformer": "frozen | lora | full",
    "trainable.query_tokens": "frozen | full (a single tensor: no LoRA)",
    "trainable.language_projection": "frozen | lora | full",
    "trainable.language_model": "frozen | lora | full",
    "lora.*.r": "LoRA rank",
    "lora.*.alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora.*.dropout": "dropout on the LoRA input",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.weight_decay": "AdamW weight decay (not on biases and norms)",
    "optim.betas": "AdamW betas",
    "optim.warmup_ratio": "fraction of the steps spent warming the learning rate up",
    "optim.max_grad_norm": "gradient clipping norm (0 = off)",
    "train.epochs": "passes over the train split (fractions allowed); ignored when max_steps > 0",
    "train.batch_size": "studies per process per micro-step",
    "train.grad_accum": "micro-steps per optimizer step",
    "train.seed": "seed of the data order, dropout and the tiny base's weights",
    "train.keep_last": "checkpoints kept (older ones are deleted)",
    "train.resume": "auto (newest checkpoint) | none (start over) | PATH to a checkpoint folder",
    "train.val_metric": "one more metrics.json key logged on the val_generate reports (e.g. rules_micro5_upos)",
    "train.val_metrics_dir": "the `clinicalblip metrics fetch` folder the neural val_metric reads its weights from",
}

_COMMENT = re.compile(r"#\s?(.*)$")


def _field_comments(cls) -> dict[str, str]:
    """field name -> its comment in the class source: on the same line, else the comment lines just above."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and not stripped.startswith(("def ", "@", '"""')):
            trailing = _COMMENT.search(line.split(":", 1)[1]) if "#" in line else None
            text = trailing.group(1).strip() if trailing else " ".join(above)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def _one_line(text: str, width: int = 120) -> str:
    """The comment on one line: whole when it fits, else its first sentence, else cut with '...'."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rstrip(" ,;") + "..."


def key_comments() -> dict[str, str]:
    """dotted key -> one line saying what it does, for every key of StageConfig."""
    out: dict[str, str] = {}

    def walk(cls, prefix: str, generic: str) -> None:
        comments = _field_comments(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, gkey = prefix + f.name, generic + f.name
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".", (gkey if cls is not C.LoraConfig else generic + "*") + ".")
                continue
            text = KEY_HELP.get(key) or KEY_HELP.get(gkey) or comments.get(f.name) or ""
            out[key] = _one_line(text)

    walk(C.StageConfig, "", "")
    return out


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def format_config(cfg: C.StageConfig) -> str:
    """The resolved config as YAML that loads back to the same values, one `# comment` per key."""
    comments = key_comments()
    lines: list[str] = []

    def emit(data: dict, prefix: str, indent: int) -> None:
        for k, v in data.items():
            key = prefix + k
            pad = "  " * indent
            if isinstance(v, dict) and key not in ("optim.lr_mult",):
                lines.append(f"{pad}{k}:")
                emit(v, key + ".", indent + 1)
                continue
            text = f"{pad}{k}: {_scalar(v)}"
            note = comments.get(key)
            lines.append(f"{text:<44}  # {note}" if note else text)

    emit(cfg.to_dict(), "", 0)
    return "\n".join(lines) + "\n"
