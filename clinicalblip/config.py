"""Typed stage configuration: YAML + dotted key=value overrides, validated before anything loads.

One YAML per stage. Unknown keys, wrong types and impossible combinations fail here with a message that
names the key, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clinicalblip.errors import UserError

COMPONENTS = ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")
POLICIES = ("frozen", "lora", "full")


class ConfigError(UserError):
    """A stage YAML or override that cannot be used."""


@dataclass
class ModelConfig:
    # "tiny" / "tiny-t5" (built in code), "shape-vicuna7b" / "shape-flant5xl" (built in code: random weights in
    # the real checkpoints' shapes), a local checkpoint folder, or a hub id (e.g. Salesforce/instructblip-vicuna-7b);
    # ignored when the stage has a parent.
    base: str = "tiny"
    # fp32 | bf16 | fp16: frozen weights are stored in this dtype and matmuls autocast to it; trainable
    # weights (LoRA, full components) stay fp32 for a stable optimizer. Under DeepSpeed the engine casts
    # the whole module to this dtype and keeps fp32 master weights in the optimizer (the stage is written
    # from those masters).
    dtype: str = "fp32"
    # none | 4bit | 8bit: the frozen language model loaded through bitsandbytes (QLoRA); GPU or CPU
    # (bitsandbytes >= 0.49). Not under DeepSpeed ZeRO-3 (use ZeRO-2 or DDP).
    quantization: str = "none"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # shape-* presets only: keep N layers in every tower (vision, Q-Former, LLM; T5 encoder and decoder) so the
    # real widths fit a CPU; 0 = the real depth. Like base, ignored when the stage has a parent.
    layers: int = 0


@dataclass
class DataConfig:
    manifest: str = ""
    train_split: str = "train"
    val_split: str = "val"
    template: str = "findings_with_context"
    # Probability of rendering a training example with no clinical context at all, so that
    # generation without an indication stays in distribution.
    context_dropout: float = 0.0
    max_report_tokens: int = 128
    # Longest prompt in LLM tokens, image tokens not counted. A longer prompt is shortened in its context
    # slots (history first, then comparison, then indication, words cut from the end), never in the
    # instruction; the run header and generation's meta file count the shortened studies.
    max_prompt_tokens: int = 256
    max_views: int = 2
    # The prior study in the model input (clinicalblip/data/priors.py): none | report (the {prior} slot of the
    # template) | images (extra image blocks after the current views, "prior PA" in the views) | both.
    prior: str = "none"
    # train only: probability of withholding one part of the prior (its report or its images, never both)
    prior_dropout: float = 0.0
    max_prior_views: int = 1  # prior images shown per study (frontal first)
    on_bad_record: str = "error"  # error | skip (skip logs the count and ids of every dropped record)
    # How images are checked before training: header (exists, size and header read cheaply, e.g. a DICOM
    # header without pixels; default), decode (every image decoded: slow on big data), exists, none.
    check_images: str = "header"
    val_max: int = 200  # val studies used for loss / generation metrics
    limit: int = 0  # use only the first N train studies (0 = all); for smoke tests
    cache_images: bool = False  # keep preprocessed pixels in memory (small datasets: the tiny demo)
    # A folder written by `clinicalblip data cache` at the processor's size: pixels are read from it.
    # Empty: raw images (or the cache that data.manifest belongs to, when it is a cache's manifest.jsonl).
    image_cache: str = ""
    # DataLoader worker processes per rank: -1 = what the machine affords, 0 = load in the main process.
    num_workers: int = -1
    # Decode JPEGs at the smallest DCT scale (JPEG 2000 DICOM: the coarsest wavelet level) still >= the
    # model's input size: several times faster on full-size radiographs (raw path; the cache does too).
    jpeg_draft: bool = True


@dataclass
class TrainableConfig:
    vision_model: str = "frozen"
    qformer: str = "frozen"
    query_tokens: str = "frozen"
    language_projection: str = "frozen"
    language_model: str = "frozen"


@dataclass
class LoraComponent:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module-name suffixes inside the component; empty = the architecture's defaults
    # (vision: qkv/projection/fc1/fc2, Q-Former: query/key/value/dense, LLaMA: q/k/v/o/gate/up/down,
    # T5: q/k/v/o/wi/wi_0/wi_1/wo).
    targets: list[str] = field(default_factory=list)


@dataclass
class LoraConfig:
    vision_model: LoraComponent = field(default_factory=LoraComponent)
    qformer: LoraComponent = field(default_factory=LoraComponent)
    language_projection: LoraComponent = field(default_factory=LoraComponent)
    language_model: LoraComponent = field(default_factory=LoraComponent)
    # peft init for lora_B; "zeros" is standard. Tests use "gaussian" on both A and B
    # (non-identity) to make merge checks meaningful.
    init: str = "default"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    # Per-component learning-rate multipliers (one parameter group each), e.g. {vision_model: 0.5}.
    lr_mult: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = from epochs
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10  # optimizer steps per log line
    eval_every: int = 0  # optimizer steps between validations; 0 = end of each epoch
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0 = none
    keep_last: int = 2
    resume: str = "auto"  # auto | none | PATH to a checkpoint folder
    val_generate: int = 0  # val studies to generate for metrics at each validation (0 = loss only)
    # One more metrics.json key logged on those reports, e.g. rules_micro5_upos, chexbert_micro14_upos,
    # radgraph_partial, bertscore_f1 (neural ones read val_metrics_dir, the `clinicalblip metrics fetch` folder).
    val_metric: str = ""
    val_metrics_dir: str = ""
    report_to: str = "none"  # none | tensorboard | wandb
    # Write the stage from the weights with the lowest val loss seen (val, never test), not the last ones.
    select_best: bool = False


@dataclass
class StageConfig:
    name: str = "stage"
    output_dir: str = ""
    parent: str | None = None  # previous stage folder (None: start from model.base)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- building
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except (TypeError, ValueError):
                raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' (known under '{prefix or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def stage_config_from_dict(data: dict, overrides: list[str] | None = None, base_dir: str | None = None) -> StageConfig:
    """Build and validate a StageConfig from a mapping (+ overrides). Relative paths resolve against base_dir."""
    data = copy.deepcopy(data or {})  # overrides must not leak into the caller's mapping
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    cfg = _build(StageConfig, data)
    validate(cfg)
    if base_dir:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def load_stage_config(path: str | os.PathLike, overrides: list[str] | None = None) -> StageConfig:
    """Read a stage YAML, apply overrides, validate. Paths in the YAML are relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    try:
        return stage_config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _resolve_paths(cfg: StageConfig, base_dir: str) -> StageConfig:
    def r(p):
        return p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    cfg.output_dir = r(cfg.output_dir)
    cfg.data.manifest = r(cfg.data.manifest)
    cfg.data.image_cache = r(cfg.data.image_cache)
    if cfg.parent:
        cfg.parent = r(cfg.parent)
    return cfg


def validate(cfg: StageConfig) -> None:
    """Reject configurations that cannot work, before any model is loaded."""
    t = cfg.trainable
    for comp in COMPONENTS:
        pol = getattr(t, comp)
        if pol not in POLICIES:
            raise ConfigError(f"trainable.{comp} must be one of {'|'.join(POLICIES)}, got '{pol}'")
    if t.query_tokens == "lora":
        raise ConfigError("trainable.query_tokens is a single tensor: use frozen or full, not lora")
    if all(getattr(t, c) == "frozen" for c in COMPONENTS):
        raise ConfigError("every component is frozen: nothing would train (set a trainable.* to lora or full)")
    if cfg.model.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"model.dtype must be fp32, bf16 or fp16, got '{cfg.model.dtype}'")
    q = cfg.model.quantization
    if q not in ("none", "4bit", "8bit"):
        raise ConfigError(f"model.quantization must be none, 4bit or 8bit, got '{q}'")
    if q != "none":
        if t.language_model == "full":
            raise ConfigError(f"model.quantization={q} quantizes the language model, which then cannot be trained "
                              "fully: set trainable.language_model to lora (QLoRA) or frozen, or quantization none")
        if cfg.model.dtype == "fp32":
            raise ConfigError(f"model.quantization={q} computes in bf16/fp16: set model.dtype=bf16")
    if cfg.model.layers < 0:
        raise ConfigError(f"model.layers must be >= 0 (0 = full depth), got {cfg.model.layers}")
    if cfg.model.layers and not cfg.parent and not cfg.model.base.startswith("shape-"):
        raise ConfigError(f"model.layers={cfg.model.layers} applies to the shape-* presets only, not to "
                          f"model.base={cfg.model.base}; use model.layers=0")
    if cfg.data.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_record must be error or skip, got '{cfg.data.on_bad_record}'")
    if cfg.data.check_images not in ("header", "decode", "exists", "none"):
        raise ConfigError(f"data.check_images must be header, decode, exists or none, got '{cfg.data.check_images}'")
    if cfg.data.num_workers < -1:
        raise ConfigError("data.num_workers must be -1 (auto), 0 or more")
    if cfg.data.max_prompt_tokens < 1:
        raise ConfigError("data.max_prompt_tokens must be >= 1")
    if cfg.data.max_views < 1:
        raise ConfigError(f"data.max_views must be >= 1 (views per study the model sees), got {cfg.data.max_views}")
    if cfg.data.max_report_tokens < 1:
        raise ConfigError(f"data.max_report_tokens must be >= 1, got {cfg.data.max_report_tokens}")
    if not (cfg.optim.lr > 0 and cfg.optim.lr == cfg.optim.lr):
        raise ConfigError(f"optim.lr must be a positive number, got {cfg.optim.lr}")
    if cfg.optim.weight_decay < 0 or cfg.optim.max_grad_norm < 0:
        raise ConfigError("optim.weight_decay and optim.max_grad_norm must be >= 0")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {cfg.optim.warmup_ratio}")
    for comp, mult in cfg.optim.lr_mult.items():
        if not mult > 0:
            raise ConfigError(f"optim.lr_mult.{comp} must be > 0, got {mult} (freeze a component with trainable.*)")
    if not 0.0 <= cfg.data.context_dropout <= 1.0:
        raise ConfigError("data.context_dropout must be in [0, 1]")
    if cfg.data.prior not in ("none", "report", "images", "both"):
        raise ConfigError(f"data.prior must be none, report, images or both, got '{cfg.data.prior}'")
    if not 0.0 <= cfg.data.prior_dropout <= 1.0:
        raise ConfigError("data.prior_dropout must be in [0, 1]")
    if cfg.data.max_prior_views < 0:
        raise ConfigError("data.max_prior_views must be >= 0")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.schedule must be cosine, linear or constant, got '{cfg.optim.schedule}'")
    for comp in cfg.optim.lr_mult:
        if comp not in COMPONENTS:
            raise ConfigError(f"optim.lr_mult.{comp}: unknown component (known: {', '.join(COMPONENTS)})")
    if cfg.lora.init not in ("default", "gaussian"):
        raise ConfigError("lora.init must be default or gaussian")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps > 0")
    if cfg.train.report_to not in ("none", "tensorboard", "wandb"):
        raise ConfigError("train.report_to must be none, tensorboard or wandb")
    if not cfg.output_dir:
        raise ConfigError("output_dir is required (the stage folder to write)")
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is required")
    for comp in ("vision_model", "qformer", "language_projection", "language_model"):
        spec = getattr(cfg.lora, comp)
        if spec.r < 1:
            raise ConfigError(f"lora.{comp}.r must be >= 1")
        if not 0.0 <= spec.dropout < 1.0:
            raise ConfigError(f"lora.{comp}.dropout must be in [0, 1)")
