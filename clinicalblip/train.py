"""One training stage: a single linear Accelerate loop (plain python, `accelerate launch`, DDP or DeepSpeed).

`train_stage` reads top to bottom as named steps: checks, records, model and policy, loaders, optimizer,
restore, fit (the one loop), finish (the stage folder). The same code runs on a CPU (gloo), one GPU, many
GPUs (DDP) and DeepSpeed ZeRO-2/3, with or without a quantized (QLoRA) language model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Sampler
from clinicalblip.progress import progress as progress_bar
from clinicalblip.progress import write as log_line
from transformers import get_scheduler

from clinicalblip import __version__
from clinicalblip.config import COMPONENTS, StageConfig
from clinicalblip.data.cache import find_image_cache, pixel_source
from clinicalblip.data.check import apply_bad_record_policy
from clinicalblip.data.collate import StudyCollator, model_inputs
from clinicalblip.data.reportlen import cut_summary
from clinicalblip.data.loader import make_loader
from clinicalblip.data.manifest import file_hash, read_manifest
from clinicalblip.errors import UserError
from clinicalblip.filemode import give_umask_mode
from clinicalblip.model import (
    build_base,
    describe_base,
    fingerprint,
    is_builtin,
    is_decoder_only,
    load_pretrained,
    quantization_config,
    quantize_from_model,
    torch_dtype,
)
from clinicalblip.prompts import Template, load_template, target_text
from clinicalblip.policy import apply_trainable, component_of, core_model, format_report
from clinicalblip.shapes import _no_zero3, full_depth_line
from clinicalblip.stages import load_stage_model, read_stage, write_stage

# Keys that may change between a run and its resume (they do not change what is trained).
RESUMABLE_KEYS = ("train.log_every", "train.save_every", "train.keep_last", "train.report_to", "train.resume",
                  "train.val_generate", "train.val_metric", "train.val_metrics_dir", "data.num_workers", "data.check_images", "data.cache_images",
                  "data.image_cache", "output_dir")


class EpochSampler(Sampler):
    """A seeded permutation per epoch: the same order on every rank and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _mixed_precision(dtype: str) -> str:
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[dtype]


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases and the query tokens are not decayed (decay would pull them towards 0)."""
    return p.ndim < 2 or name.endswith(".bias") or component_of(name) == "query_tokens" or "norm" in name.lower()


def _param_groups(model, cfg: StageConfig) -> list[dict]:
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((component_of(name), _no_decay(name, p)), []).append(p)
    out = []
    for comp in COMPONENTS:
        for no_decay in (False, True):
            if (comp, no_decay) in groups:
                out.append({"params": groups[(comp, no_decay)], "name": comp + ("/no_decay" if no_decay else ""),
                            "lr": cfg.optim.lr * cfg.optim.lr_mult.get(comp, 1.0),
                            "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay})
    return out


def _corpus(records: list[dict]) -> list[str]:
    texts = []
    for r in records:
        for k in ("findings", "impression", "indication", "history", "comparison"):
            if r.get(k):
                texts.append(r[k])
    return texts


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("lr_mult",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(cfg: StageConfig, data_hash: str) -> dict:
    """What a checkpoint must agree with to be resumed: the resolved config (minus RESUMABLE_KEYS) + data."""
    # the manifest's path may move: its content is what counts (data_hash)
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in RESUMABLE_KEYS and k != "data.manifest"}
    blob = json.dumps(flat, sort_keys=True, default=str)
    return {"config": flat, "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16], "data_hash": data_hash}


def token_counts(labels: torch.Tensor, decoder_only: bool) -> torch.Tensor:
    """Number of supervised (report) tokens, counted as the loss counts them."""
    return ((labels[:, 1:] if decoder_only else labels) != -100).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, decoder_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over report tokens and their count (decoder-only logits predict the next token)."""
    if decoder_only:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


@torch.no_grad()
def evaluate_loss(model, loader, accelerator) -> float:
    """Token-weighted mean loss over a loader (all ranks)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        inputs = model_inputs(batch)
        n = (inputs["labels"] != -100).sum()
        loss = model(**inputs).loss
        total += loss.float() * n
        count += n
    total = accelerator.reduce(total, "sum")
    count = accelerator.reduce(count, "sum")
    model.train(was_training)
    return (total / count.clamp(min=1)).item()


def _checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    dirs = [d for d in ckpt_root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "progress.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def zero_stage(accelerator) -> int:
    """0 without DeepSpeed, else the ZeRO stage."""
    ds = accelerator.state.deepspeed_plugin
    return int(ds.zero_stage) if ds is not None else 0


def gather_trainable(model, accelerator) -> dict[str, torch.Tensor]:
    """Full fp32 copies of every trainable parameter, on the CPU of the main process (None elsewhere).

    Collective: every rank must call it. Under DeepSpeed the fp32 master weights are read (under ZeRO-3 the
    parameters themselves are shape-[0] placeholders; under bf16 the module holds rounded copies).
    """
    unwrapped = accelerator.unwrap_model(model)
    out = {}
    if zero_stage(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in unwrapped.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                if accelerator.is_main_process:
                    out[name] = full.detach().to("cpu", torch.float32, copy=True)
    else:
        for name, p in unwrapped.named_parameters():
            if p.requires_grad and accelerator.is_main_process:
                out[name] = p.detach().to("cpu", torch.float32, copy=True)
    return out if accelerator.is_main_process else None


# ---------------------------------------------------------------------------------------------- steps
@dataclass
class Run:
    """What every step shares: the config, the accelerator and where output goes."""

    cfg: StageConfig
    accelerator: Accelerator
    out_dir: Path
    log: Callable[[str], None]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def zero(self) -> int:
        return zero_stage(self.accelerator)


def make_accelerator(cfg: StageConfig) -> Accelerator:
    """The Accelerator for a stage; on a GPU-less machine launched ranks form a gloo group (DDP or DeepSpeed)."""
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not launched:
        # accelerate's state is a per-process singleton: a second stage trained in the same Python process
        # (a notebook, the tests) with another precision would otherwise be refused
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    kwargs = {}
    if not torch.cuda.is_available():
        if use_ds:
            # cpu=True would switch DeepSpeed off; without a backend accelerate would fall back to one process
            # per rank (both "main", data not sharded). DeepSpeed's CPU accelerator takes the gloo group.
            if launched:
                kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True  # torchrun / accelerate launch ranks then form a gloo group (MULTI_CPU)
    return Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=_mixed_precision(cfg.model.dtype),
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_dir=cfg.output_dir,
        **kwargs,
    )


# train.report_to -> (the module its accelerate tracker imports, the package that brings it)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing: accelerate would otherwise log nothing, with rc 0."""
    import importlib.util

    if report_to not in TRACKER_PACKAGES:
        return
    module, package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        extra = " (pip install 'clinicalblip[tracking]' brings it)" if report_to == "tensorboard" else ""
        raise UserError(f"train.report_to={report_to} needs the '{package}' package, which is not installed: "
                        f"pip install {package}{extra}, or set train.report_to=none")


def tracker_config(cfg: StageConfig) -> dict:
    """The resolved config as flat hyperparameters (key -> int/float/str/bool) for TensorBoard / W&B."""
    out = {}
    for k, v in _flatten(cfg.to_dict()).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
    return out


def _checks(cfg: StageConfig) -> Run:
    """Refuse combinations that cannot work before anything is built or loaded; make the accelerator."""
    check_tracker(cfg.train.report_to)
    if cfg.model.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("model.dtype=fp16 is not supported on CPU: use fp32 (or bf16)")
    if cfg.model.quantization != "none":
        quantization_config(cfg.model.quantization, cfg.model.dtype)  # bitsandbytes present?
    if cfg.train.val_metric:
        from clinicalblip.metrics.neural_eval import metric_for_key
        from clinicalblip.metrics.weights import require

        if not cfg.train.val_generate:
            raise UserError("train.val_metric needs train.val_generate > 0 (the reports it is computed on)")
        needs = metric_for_key(cfg.train.val_metric)
        if needs:  # a missing weights file fails now, not at the first validation
            require(cfg.train.val_metrics_dir or None, [needs])
    accelerator = make_accelerator(cfg)
    zero = zero_stage(accelerator)
    if cfg.model.quantization != "none" and zero == 3:
        raise UserError(f"model.quantization={cfg.model.quantization} under DeepSpeed ZeRO-3 is not supported: "
                        "ZeRO-3 would shard the packed quantized weights. Use ZeRO-2 "
                        "(configs/accelerate/zero2.yaml) or plain DDP for QLoRA")
    main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    set_seed(cfg.train.seed)
    return Run(cfg=cfg, accelerator=accelerator, out_dir=Path(cfg.output_dir), log=log)


@dataclass
class Records:
    train: list[dict]
    val: list[dict]
    template: Template
    data_hash: str
    image_cache: str | None = None  # a `data cache` folder the pixels come from (None: the raw images)


def _records(run: Run) -> Records:
    """Read and check the manifest (a bad manifest fails before a model loads), select the splits."""
    cfg = run.cfg
    # The whole manifest is checked, not one split: a patient in two splits is only visible across splits.
    records = read_manifest(cfg.data.manifest)
    image_cache = find_image_cache(cfg.data.image_cache, cfg.data.manifest)
    template = load_template(cfg.data.template)
    # One rule for train, val and test: a record without the template's target section is unusable (refused,
    # or skipped with its id logged); val loss on empty targets would otherwise drive select_best.
    records = apply_bad_record_policy(records, cfg.data.on_bad_record, log=run.log, check_images=cfg.data.check_images,
                                      manifest=cfg.data.manifest, image_cache=image_cache, target=template.target)
    train = [r for r in records if r["split"] == cfg.data.train_split]
    if cfg.data.limit:
        train = train[: cfg.data.limit]
    if not train:
        raise UserError(f"{cfg.data.manifest}: no usable '{cfg.data.train_split}' records")
    val = [r for r in records if r["split"] == cfg.data.val_split][: cfg.data.val_max]
    return Records(train=train, val=val, template=template, data_hash=file_hash(cfg.data.manifest),
                   image_cache=image_cache)


@dataclass
class Built:
    model: object
    processor: object
    report: dict
    base: dict
    parent_desc: str


def _model(run: Run, records: Records) -> Built:
    """The parent chain (merged) or the base, then this stage's trainable policy and precision."""
    if run.zero != 3:
        return _load_model(run, records)
    if not run.cfg.parent and run.cfg.model.quantization == "none":
        # A root stage loads partitioned: transformers reads the checkpoint under zero.Init, so each rank holds
        # its 1/N of the base, never a whole copy.
        built = _load_model(run, records)
        low = torch_dtype(run.cfg.model.dtype)
        for p in built.model.parameters():
            # The base arrived partitioned in model.dtype; the new LoRA weights (fp32) are partitioned later
            # by deepspeed.initialize, whose optimizer groups need one dtype: cast them as the engine would.
            if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != low:
                p.data = p.data.to(low)
        params = list(built.model.parameters())
        sharded = sum(1 for p in params if hasattr(p, "ds_id"))
        run.log(f"ZeRO-3: base loaded partitioned (zero.Init), {sharded} of {len(params)} tensors sharded over "
                f"{run.accelerator.num_processes} ranks")
        return built
    # Under ZeRO-3, transformers partitions weights while loading (zero.Init, switched on by the config that
    # accelerate registers, whatever zero3_init_flag says); a parent's weights and LoRA could then not be
    # applied. Every rank loads whole weights instead, and deepspeed.initialize partitions them.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return _load_model(run, records)
    finally:
        run.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _load_model(run: Run, records: Records) -> Built:
    cfg, out_dir, main, acc = run.cfg, run.out_dir, run.main, run.accelerator
    quant = cfg.model.quantization
    # Everything arrives in the training dtype (no fp32 copy of a bf16 model at any time). The parts trained
    # `full` are read in fp32 for the optimizer, from the checkpoint's stored values. Under DeepSpeed the engine
    # casts the whole module to bf16 and keeps its own fp32 master weights: everything loads in bf16 there.
    fp32_parts = () if run.zero or quant != "none" or cfg.model.dtype == "fp32" else \
        tuple(c for c in COMPONENTS if getattr(cfg.trainable, c) == "full")
    if cfg.parent:
        model, processor, chain = load_stage_model(cfg.parent, dtype=cfg.model.dtype, fp32_components=fp32_parts)
        if quant != "none":
            # QLoRA child: the merged parent chain is quantized in memory (no full-precision copy on disk).
            model = quantize_from_model(model, quant, cfg.model.dtype)
        parent_info = read_stage(cfg.parent)
        base = dict(chain[0]["base"])
        base["path"] = os.path.relpath(os.path.join(chain[0]["dir"], base["path"]), out_dir.resolve()) \
            if os.path.exists(os.path.join(chain[0]["dir"], base["path"])) else base["path"]
        parent_desc = f"{cfg.parent} ({parent_info['name']})"
    else:
        saved_base = out_dir / "base"
        if is_builtin(cfg.model.base):
            if not ((saved_base / "config.json").is_file() and cfg.train.resume != "none"):
                # Built once, on the main process, in the training dtype, and saved with the stage (the chain
                # stays self-contained).
                if main:
                    with _no_zero3():  # built whole on the main process, saved, then loaded partitioned
                        model, processor = build_base(cfg.model.base, dtype=cfg.model.dtype,
                                                      corpus=_corpus(records.train), seed=cfg.train.seed,
                                                      layers=cfg.model.layers)
                    model.save_pretrained(saved_base)
                    processor.save_pretrained(saved_base)
                    give_umask_mode(saved_base)  # safetensors writes 0600
                    del model
                acc.wait_for_everyone()
            # Every rank loads the saved copy: the very same base everywhere, and under ZeRO-3 a model built
            # from config after the Accelerator exists would be partitioned half-initialised.
            model, processor = load_pretrained(str(saved_base), quantization=quant, dtype=cfg.model.dtype,
                                               fp32_components=fp32_parts)
            base = {"name": cfg.model.base, "path": "base", "fingerprint": fingerprint(saved_base)}
        else:
            model, processor = load_pretrained(cfg.model.base, dtype=cfg.model.dtype, quantization=quant,
                                               trust_remote_code=cfg.model.trust_remote_code,
                                               fp32_components=fp32_parts)
            base = describe_base(cfg.model.base)  # a hub id is pinned to its cached snapshot's commit
        parent_desc = "none (base)"
    model.train()
    if quant != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        # newer transformers 5.x renamed it; older 5.x (e.g. the GPU image's 5.17) only has the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # with a frozen embedding layer, checkpointed blocks need inputs that require grad (PEFT's note)
        model.enable_input_require_grads()
    # New LoRA weights draw from the seed, not from whatever loading consumed (a ZeRO-3 partitioned load
    # initialises modules before it copies the weights in): every backend starts from the same adapter.
    set_seed(cfg.train.seed)
    model, report = apply_trainable(model, cfg)
    if cfg.model.dtype != "fp32" and not run.zero:
        # Frozen weights in the low-precision dtype (half the memory); trainable ones fp32 for the optimizer.
        # Under DeepSpeed the engine casts the whole module to bf16 and keeps fp32 master weights itself.
        low = torch_dtype(cfg.model.dtype)
        for p in model.parameters():
            if p.is_floating_point() and p.dtype in (torch.float32, torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32 if p.requires_grad else low)
    return Built(model=model, processor=processor, report=report, base=base, parent_desc=parent_desc)


@dataclass
class Loaders:
    collate: StudyCollator
    sampler: EpochSampler
    train: DataLoader
    val: DataLoader | None
    val_records: list[dict] = field(default_factory=list)  # for train.val_generate


def _loaders(run: Run, records: Records, built: Built) -> Loaders:
    cfg = run.cfg
    collate = StudyCollator(
        processor=built.processor, template=records.template, num_query_tokens=built.processor.num_query_tokens,
        decoder_only=is_decoder_only(core_model(built.model)), mode="train", max_views=cfg.data.max_views,
        max_report_tokens=cfg.data.max_report_tokens, context_dropout=cfg.data.context_dropout, seed=cfg.train.seed,
        image_cache=pixel_source(built.processor.image_processor, records.image_cache, jpeg_draft=cfg.data.jpeg_draft,
                                 memory=cfg.data.cache_images),
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        prior=cfg.data.prior, prior_dropout=cfg.data.prior_dropout, max_prior_views=cfg.data.max_prior_views,
    )
    collate.check_image_tokens(core_model(built.model).config)  # refuse an <image> id / query count mismatch now
    val_collate = StudyCollator(
        processor=built.processor, template=records.template, num_query_tokens=built.processor.num_query_tokens,
        decoder_only=collate.decoder_only, mode="train", max_views=cfg.data.max_views,
        max_report_tokens=cfg.data.max_report_tokens, image_cache=collate.image_cache,
        max_prompt_tokens=cfg.data.max_prompt_tokens, prior=cfg.data.prior, max_prior_views=cfg.data.max_prior_views,
    )
    sampler = EpochSampler(len(records.train), cfg.train.seed)
    # the sampler carries the epoch into the loader workers (context dropout depends on it)
    train = make_loader(records.train, cfg.train.batch_size, collate, sampler=sampler, num_workers=cfg.data.num_workers)
    val = make_loader(records.val, cfg.train.batch_size, val_collate, num_workers=cfg.data.num_workers) \
        if records.val else None
    return Loaders(collate=collate, sampler=sampler, train=train, val=val, val_records=records.val)


@dataclass
class Schedule:
    optimizer: object
    scheduler: object
    total_steps: int
    steps_per_epoch: int
    num_epochs: int


def _optimizer(run: Run, records: Records, built: Built, loaders: Loaders) -> Schedule:
    """AdamW per component (decay / no decay), the schedule in optimizer steps; everything prepared."""
    cfg, acc = run.cfg, run.accelerator
    optimizer = torch.optim.AdamW(_param_groups(built.model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(records.train) / (cfg.train.batch_size * acc.num_processes))
                                / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup", optimizer,
        num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps) * acc.num_processes,
        num_training_steps=total_steps * acc.num_processes,
    )
    ds = acc.state.deepspeed_plugin
    if ds is not None:
        # accelerate turns "gradient_clipping": "auto" into 1.0; the stage YAML owns clipping (0 = off).
        ds.deepspeed_config["gradient_clipping"] = float(cfg.optim.max_grad_norm)
        ds.gradient_clipping = float(cfg.optim.max_grad_norm)
        # accelerate sizes the ZeRO buckets from model.config.hidden_size, which InstructBLIP's composite
        # config lacks: size them from the language model's width (accelerate's own formulas).
        h = core_model(built.model).config.text_config.hidden_size
        zero_cfg = ds.deepspeed_config.setdefault("zero_optimization", {})
        for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                           ("stage3_param_persistence_threshold", 10 * h)):
            if zero_cfg.get(key) == "auto":
                zero_cfg[key] = value
    built.model, optimizer, loaders.train, scheduler = acc.prepare(built.model, optimizer, loaders.train, scheduler)
    if loaders.val is not None:
        loaders.val = acc.prepare(loaders.val)
    return Schedule(optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)


@dataclass
class Progress:
    global_step: int = 0
    epoch: int = 0
    skip_batches: int = 0


def _restore(run: Run, records: Records, identity: dict) -> Progress:
    """Resume from the newest checkpoint (auto) or a given one, refusing one made with another config/data."""
    cfg, acc = run.cfg, run.accelerator
    ckpt_root = run.out_dir / "checkpoints"
    resume_dir = None
    if cfg.train.resume == "auto":
        found = _checkpoint_dirs(ckpt_root)
        resume_dir = found[-1] if found else None
    elif cfg.train.resume not in ("none", ""):
        resume_dir = Path(cfg.train.resume)
        if not (resume_dir / "progress.json").is_file():
            raise UserError(f"train.resume={cfg.train.resume}: not a checkpoint folder (no progress.json)")
    if resume_dir is None:
        old = _checkpoint_dirs(ckpt_root)
        if old:
            run.log(f"train.resume={cfg.train.resume}: starting over; removing {len(old)} old checkpoint(s) in {ckpt_root}")
        acc.wait_for_everyone()
        if run.main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            # A fresh start owns metrics.jsonl: an earlier run's rows would mix into this one's curve.
            (run.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        acc.wait_for_everyone()
        return Progress()
    progress = json.loads((resume_dir / "progress.json").read_text())
    saved = progress.get("identity")
    if saved is None:
        raise UserError(f"{resume_dir}: checkpoint without a config record (made by an older clinicalblip); "
                        "start over with train.resume=none")
    if saved["data_hash"] != identity["data_hash"]:
        raise UserError(f"{resume_dir}: the manifest {cfg.data.manifest} changed since this checkpoint "
                        f"(data hash {saved['data_hash']} -> {identity['data_hash']}); resuming would mix two datasets. "
                        "Restore the manifest, or start over with train.resume=none")
    if saved["config_hash"] != identity["config_hash"]:
        keys = sorted(set(saved["config"]) | set(identity["config"]))
        changed = [k for k in keys if saved["config"].get(k) != identity["config"].get(k)]
        diff = [f"{k}: {saved['config'].get(k)!r} -> {identity['config'].get(k)!r}" for k in changed]
        if changed == ["train.max_steps"] and cfg.train.max_steps > int(progress["global_step"]):
            # A longer run: the schedule is rebuilt for the new total and followed from the checkpoint's step on
            # (README, "Resuming"); the LR moves to the new curve's value at that step.
            run.log(f"train.max_steps {saved['config']['train.max_steps']} -> {cfg.train.max_steps}: extending the "
                    f"run from step {progress['global_step']}; the {cfg.optim.schedule} schedule now ends at step "
                    f"{cfg.train.max_steps}")
            changed = []
        if changed == ["train.max_steps"]:
            raise UserError(f"{resume_dir}: train.max_steps={cfg.train.max_steps} is not beyond this checkpoint's step "
                            f"{progress['global_step']}: a resume may only extend the run (or start over with "
                            "train.resume=none)")
    if saved["config_hash"] != identity["config_hash"] and changed:
        raise UserError(f"{resume_dir}: the config differs from the one this checkpoint was trained with: "
                        f"{'; '.join(diff)}. Undo the change to resume, or start over with train.resume=none "
                        f"(keys that may change on resume: {', '.join(RESUMABLE_KEYS)}; train.max_steps may grow)")
    acc.load_state(str(resume_dir))
    p = Progress(progress["global_step"], progress["epoch"], progress["batches_in_epoch"])
    metrics = run.out_dir / "metrics.jsonl"
    if run.main and metrics.is_file():
        # rows logged after the checkpoint (by the run that died) are logged again by this one
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= p.global_step]
        metrics.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    run.log(f"resumed from {resume_dir} at step {p.global_step} (epoch {p.epoch}, batch {p.skip_batches})")
    return p


def _backend_words(distributed_type: str, num_processes: int) -> str:
    """accelerate's DistributedType in plain words ("NO" means one process, no distribution)."""
    words = {"NO": "single process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP (CPU, gloo)", "FSDP": "FSDP",
             "DEEPSPEED": "DeepSpeed", "XLA": "XLA", "MULTI_XPU": "DDP (XPU)", "MULTI_NPU": "DDP (NPU)",
             "MULTI_MLU": "DDP (MLU)", "MULTI_SDAA": "DDP (SDAA)", "MULTI_MUSA": "DDP (MUSA)",
             "MULTI_HPU": "DDP (HPU)"}.get(distributed_type, distributed_type.lower().replace("_", " "))
    return words if num_processes == 1 or distributed_type == "NO" else f"{words}, {num_processes} processes"


def _header(run: Run, records: Records, built: Built, loaders: Loaders, sched: Schedule) -> None:
    cfg, acc = run.cfg, run.accelerator
    eff_batch = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    backend = f"DeepSpeed ZeRO-{run.zero}" if run.zero else _backend_words(acc.distributed_type.value,
                                                                            acc.num_processes)
    run.log("=" * 78)
    run.log(f"clinicalblip {__version__} | stage '{cfg.name}' -> {run.out_dir}")
    run.log(f"parent: {built.parent_desc} | base: {built.base['name']} | template: {records.template.name} | "
            f"dtype: {cfg.model.dtype} | quantization: {cfg.model.quantization}")
    run.log(f"train: {len(records.train)} studies, val: {len(records.val)} | effective batch {eff_batch} "
            f"({cfg.train.batch_size} x {cfg.train.grad_accum} accum x {acc.num_processes} proc) | "
            f"{sched.total_steps} steps ({sched.num_epochs} epoch(s)) | {backend} on {acc.device}")
    run.log(f"images: {('cache ' + records.image_cache) if records.image_cache else 'raw'} | loader workers per rank: "
            f"{getattr(loaders.train, 'num_workers', 0)}")
    run.log(format_report(built.report))
    run.log(full_depth_line(acc.unwrap_model(built.model), built.base["name"], cfg))
    if not run.main:
        return  # counting shortened prompts tokenizes every study: the main process only
    run.log(f"prompts: {loaders.collate.count_shortened(records.train)} of {len(records.train)} train studies "
            f"shortened to data.max_prompt_tokens={cfg.data.max_prompt_tokens} "
            "(history, then comparison, then indication cut)")
    # a cut report ends without EOS (the model is not taught to stop mid-sentence), but it is still cut
    run.log("reports: " + cut_summary(loaders.collate.report_lengths(records.train), cfg.data.max_report_tokens)
            + " (data.max_report_tokens)")
    run.log("=" * 78)


@dataclass
class Fit:
    global_step: int
    last_val: float | None = None
    last_val_step: int | None = None  # the step whose weights last_val belongs to
    best_val: float = float("inf")
    best_state: dict | None = field(default=None, repr=False)
    best_step: int | None = None


def _save_checkpoint(run: Run, global_step: int, epoch: int, batches_in_epoch: int, identity: dict) -> None:
    # Written aside, then renamed: a crash mid-save never leaves a half checkpoint that 'auto' would pick.
    acc, ckpt_root = run.accelerator, run.out_dir / "checkpoints"
    final, tmp = ckpt_root / f"step-{global_step}", ckpt_root / f".tmp-step-{global_step}"
    if run.main and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if run.main:
        give_umask_mode(tmp)  # safetensors writes 0600: a shared run folder stays resumable by its group
        (tmp / "progress.json").write_text(json.dumps(
            {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "identity": identity}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoint_dirs(ckpt_root)[: -run.cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _windows(loader, size: int):
    """Micro-batches grouped by optimizer step (the last window of an epoch may be shorter)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _fit(run: Run, built: Built, loaders: Loaders, sched: Schedule, progress: Progress, identity: dict) -> Fit:
    """The loop: windows of micro-batches, one optimizer step each; log, validate, checkpoint."""
    cfg, acc = run.cfg, run.accelerator
    model, optimizer, scheduler = built.model, sched.optimizer, sched.scheduler
    decoder_only = loaders.collate.decoder_only
    metrics_path = run.out_dir / "metrics.jsonl"
    if run.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)

    def log_metrics(row: dict) -> None:
        if run.main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        if cfg.train.report_to != "none":
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=fit.global_step)

    fit = Fit(global_step=progress.global_step)
    t_interval, samples_interval, loss_interval, n_interval = time.perf_counter(), 0, 0.0, 0
    bar = progress_bar(total=sched.total_steps, initial=fit.global_step, desc=cfg.name, unit="step",
                       disable=not acc.is_local_main_process)
    model.train()
    done = fit.global_step >= sched.total_steps
    for epoch in range(progress.epoch, sched.num_epochs):
        if done:
            break
        loaders.train.set_epoch(epoch)
        loaders.sampler.set_epoch(epoch)  # read by the loader when the pass starts; workers get it per batch
        loader, batches_in_epoch = loaders.train, 0
        if epoch == progress.epoch and progress.skip_batches:
            loader = acc.skip_first_batches(loaders.train, progress.skip_batches)
            batches_in_epoch = progress.skip_batches
        for window in _windows(loader, cfg.train.grad_accum):
            # Normalise by the report tokens of the whole window on ALL ranks: the summed gradient then equals
            # one process holding the whole effective batch (a per-micro-step or per-rank mean would weight
            # short reports too much). accelerate/DeepSpeed divide by grad_accum and DDP averages over ranks:
            # both undone here.
            n_window = sum(token_counts(b["labels"], decoder_only) for b in window).to(acc.device)
            n_global = acc.reduce(n_window.detach().clone(), "sum").clamp(min=1).float()
            scale = acc.num_processes * cfg.train.grad_accum / n_global
            for i, batch in enumerate(window):
                boundary = i == len(window) - 1
                # sync_gradients drives DDP no_sync, DeepSpeed's accumulation boundary and the optimizer step
                acc.sync_gradients = boundary
                with contextlib.nullcontext() if boundary else acc.no_sync(model):
                    inputs = model_inputs(batch)
                    logits = model(**inputs).logits
                    loss_sum, _ = token_loss_sum(logits, inputs["labels"], decoder_only)
                    loss = loss_sum * scale
                    acc.backward(loss)
                loss_interval += (loss_sum.detach().float() / n_global).item()  # this rank's share
                samples_interval += len(batch["ids"]) * acc.num_processes
            if os.environ.get("CLINICALBLIP_TEST_GRADS_AT_STEP") == str(fit.global_step + 1) and not run.zero:
                _dump_grads(run, model, [int(token_counts(b["labels"], decoder_only)) for b in window])
            grad_norm = None
            if run.zero:
                grad_norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()  # DeepSpeed clipped in backward
            else:  # max_grad_norm 0: no clipping, but the norm is still logged
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += len(window)
            n_interval += 1
            fit.global_step += 1
            bar.update(1)
            if fit.global_step % cfg.train.log_every == 0 or fit.global_step == sched.total_steps:
                dt = time.perf_counter() - t_interval
                # the ranks' shares add up to the mean loss of each step's effective batch
                mean_loss = acc.reduce(torch.tensor(loss_interval, device=acc.device), "sum").item()
                row = {"step": fit.global_step, "epoch": epoch, "loss": mean_loss / max(n_interval, 1),
                       "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "samples_per_s": samples_interval / max(dt, 1e-9), "peak_mem_gib": _peak_memory_gib()}
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if run.main:
                    log_line(f"step {fit.global_step}/{sched.total_steps} | epoch {epoch} | loss {row['loss']:.4f} | "
                               f"lr {row['lr']:.2e} | grad {row['grad_norm'] or 0:.2f} | "
                               f"{row['samples_per_s']:.1f} samples/s | peak {row['peak_mem_gib']:.2f} GiB")
                log_metrics(row)
                t_interval, samples_interval, loss_interval, n_interval = time.perf_counter(), 0, 0.0, 0
            end_of_epoch = batches_in_epoch >= len(loaders.train)
            if loaders.val is not None and (
                (cfg.train.eval_every and fit.global_step % cfg.train.eval_every == 0)
                or (not cfg.train.eval_every and end_of_epoch)
            ):
                _validate(run, model, loaders, fit, epoch, log_metrics)
            if cfg.train.save_every and fit.global_step % cfg.train.save_every == 0 and fit.global_step < sched.total_steps:
                _save_checkpoint(run, fit.global_step, epoch + 1 if end_of_epoch else epoch,
                                 0 if end_of_epoch else batches_in_epoch, identity)
            if os.environ.get("CLINICALBLIP_TEST_KILL_AT_STEP") == str(fit.global_step):
                os._exit(137)  # tests: die like a SIGKILL (no cleanup, no stage folder)
            if fit.global_step >= sched.total_steps:
                done = True
                break
    bar.close()
    acc.sync_gradients = True
    if loaders.val is not None and fit.last_val_step != fit.global_step:
        # The stage holds the last step's weights: its val loss must be theirs, not an earlier step's (max_steps
        # may end mid-epoch after the last validation). Compared with the best snapshot like any validation.
        _validate(run, model, loaders, fit, None, log_metrics, generate=False)
    return fit


def _dump_grads(run: Run, model, window_tokens: list[int]) -> None:
    """Tests: the accumulated (synchronised) gradients of one optimizer step, before clipping."""
    from safetensors.torch import save_file

    if run.main:
        grads = {n: p.grad.detach().float().cpu().contiguous() for n, p in
                 run.accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        save_file(grads, os.environ["CLINICALBLIP_TEST_GRADS_OUT"],
                  metadata={"window_tokens": json.dumps(window_tokens)})


def _validate(run: Run, model, loaders: Loaders, fit: Fit, epoch: int | None, log_metrics,
              generate: bool = True) -> None:
    """Validation loss (all ranks); with select_best, a gathered snapshot of the best trainable weights."""
    acc = run.accelerator
    acc.sync_gradients = True
    fit.last_val = evaluate_loss(model, loaders.val, acc)
    fit.last_val_step = fit.global_step
    if fit.last_val < fit.best_val and run.cfg.train.select_best:
        fit.best_state = gather_trainable(model, acc)  # collective: every rank takes part
        fit.best_step = fit.global_step
    fit.best_val = min(fit.best_val, fit.last_val)
    log_metrics({"step": fit.global_step, "val_loss": fit.last_val} if epoch is None else
                {"step": fit.global_step, "epoch": epoch, "val_loss": fit.last_val})
    if run.main:
        log_line(f"step {fit.global_step} | val_loss {fit.last_val:.4f}")
    if generate and run.cfg.train.val_generate:
        row = validation_reports(run, model, loaders)
        if row:
            row.update(step=fit.global_step, epoch=epoch)
            log_metrics(row)


def validation_reports(run: Run, model, loaders: Loaders) -> dict | None:
    """Greedy reports for the first `train.val_generate` val studies and their clinical F1 (main process)."""
    from clinicalblip.metrics.clinical import clinical_scores
    from clinicalblip.metrics.labeler import label_report

    acc, cfg = run.accelerator, run.cfg
    records = loaders.val_records[: cfg.train.val_generate]
    if not records:
        return None
    collate = StudyCollator(
        processor=loaders.collate.processor, template=loaders.collate.template,
        num_query_tokens=loaders.collate.num_query_tokens, decoder_only=loaders.collate.decoder_only,
        mode="generate", max_views=loaders.collate.max_views, max_prompt_tokens=loaders.collate.max_prompt_tokens,
        prior=loaders.collate.prior, max_prior_views=loaders.collate.max_prior_views,
    )
    mine = records[acc.process_index:: acc.num_processes]
    # Under ZeRO-3 every rank must run the same number of forward passes (synced_gpus); pad with a repeat.
    per_rank = math.ceil(len(records) / acc.num_processes)
    mine = (mine + records[:1] * per_rank)[:per_rank]
    unwrapped = core_model(acc.unwrap_model(model))
    was_training = unwrapped.training
    unwrapped.eval()
    texts = []
    with torch.no_grad():
        for i in range(0, len(mine), cfg.train.batch_size):
            chunk = mine[i: i + cfg.train.batch_size]
            batch = collate(chunk)
            inputs = {k: v.to(acc.device) for k, v in model_inputs(batch).items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(next(unwrapped.parameters()).dtype)
            if run.zero == 3:  # partitioned weights: generate's synced_gpus keeps the ranks in step
                out = unwrapped.generate(**inputs, max_new_tokens=cfg.data.max_report_tokens, num_beams=1,
                                         do_sample=False, synced_gpus=True)
                if loaders.collate.decoder_only and out.shape[1] > inputs["input_ids"].shape[1]:
                    out = out[:, inputs["input_ids"].shape[1]:]
            else:  # the decode path generate and serve use (same tokens as plain generate)
                from clinicalblip.decode import Decoder

                out = Decoder(unwrapped).generate(inputs, max_new_tokens=cfg.data.max_report_tokens, num_beams=1)
            texts += [(str(r["id"]), t.strip()) for r, t in zip(
                chunk, loaders.collate.processor.tokenizer.batch_decode(out, skip_special_tokens=True))]
    unwrapped.train(was_training)
    from accelerate.utils import gather_object

    pairs = dict(gather_object(texts))
    if not run.main:
        return None
    refs = {str(r["id"]): target_text(loaders.collate.template, r) for r in records}
    ids = [i for i in refs if i in pairs]
    scores = clinical_scores([label_report(refs[i]) for i in ids], [label_report(pairs[i]) for i in ids],
                             bootstrap=0)
    row = {"val_generated": len(ids), "val_clinical_macro_f1": scores["macro"]["f1"],
           "val_clinical_micro_f1": scores["micro"]["f1"], "val_sample": {ids[0]: pairs[ids[0]]} if ids else {}}
    if cfg.train.val_metric and ids:
        from clinicalblip.metrics.neural_eval import named_metric

        row[f"val_{cfg.train.val_metric}"] = named_metric(cfg.train.val_metric, [refs[i] for i in ids],
                                                         [pairs[i] for i in ids], cfg.train.val_metrics_dir or None)
    return row


def _finish(run: Run, records: Records, built: Built, fit: Fit) -> Path:
    """Gather the trainable weights on every rank, write the stage folder on the main process."""
    acc, cfg = run.accelerator, run.cfg
    acc.wait_for_everyone()
    state = gather_trainable(built.model, acc)  # collective (ZeRO-3: the parameters are partitioned)
    if cfg.train.select_best and fit.best_state is not None and fit.last_val is not None and fit.best_val < fit.last_val:
        state = fit.best_state
        run.log(f"select_best: writing the weights of step {fit.best_step} (val_loss {fit.best_val:.4f} "
                f"< final {fit.last_val:.4f})")
        fit.last_val = fit.best_val
    if run.main:
        metrics = {"val_loss": fit.last_val, "best_val_loss": fit.best_val if fit.best_val < float("inf") else None,
                   "best_step": fit.best_step, "steps": fit.global_step, "train_studies": len(records.train)}
        write_stage(run.out_dir, acc.unwrap_model(built.model), built.processor, cfg, records.template, built.report,
                    base=built.base, parent=os.path.abspath(cfg.parent) if cfg.parent else None, metrics=metrics,
                    data_hash=records.data_hash, trainable_state=state)
        run.log(f"stage '{cfg.name}' written to {run.out_dir} "
                f"(val_loss {fit.last_val if fit.last_val is None else round(fit.last_val, 4)})")
    acc.wait_for_everyone()
    if cfg.train.report_to != "none":
        acc.end_training()
    return run.out_dir


def train_stage(cfg: StageConfig) -> Path:
    """Train one stage and write its folder. Returns the stage folder path."""
    run = _checks(cfg)
    records = _records(run)
    built = _model(run, records)
    loaders = _loaders(run, records, built)
    sched = _optimizer(run, records, built, loaders)
    identity = run_identity(cfg, records.data_hash)
    progress = _restore(run, records, identity)
    _header(run, records, built, loaders, sched)
    if cfg.train.report_to != "none":
        # the resolved config as hyperparameters: a tracked run says what it trained
        run.accelerator.init_trackers(cfg.name, config=tracker_config(cfg))
    fit = _fit(run, built, loaders, sched, progress, identity)
    return _finish(run, records, built, fit)


def interrupted_message(cfg: StageConfig, command: str) -> str:
    """What Ctrl-C during training leaves: the newest checkpoint and the command that resumes from it."""
    found = _checkpoint_dirs(Path(cfg.output_dir) / "checkpoints")
    if not found:
        how = ("train.save_every=0: no checkpoint is written" if cfg.train.save_every <= 0
               else f"no checkpoint yet (one every train.save_every={cfg.train.save_every} steps)")
        return (f"interrupted: {how}, so a rerun starts over. Set train.save_every=N to make a run resumable")
    last = found[-1]
    return (f"interrupted: the last checkpoint is {last} (step {last.name.split('-')[1]}). Resume from it with the "
            f"same command: {command}" + ("" if cfg.train.resume == "auto" else " train.resume=auto"))
