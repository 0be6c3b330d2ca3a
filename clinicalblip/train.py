"""One training stage: a single linear Accelerate loop (plain python or `accelerate launch`).

Reads top to bottom: accelerator, model (base or parent chain) + trainable policy, data, optimizer and
schedule, resume, the loop (accumulate, clip, step, log, validate, checkpoint), then the stage folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from clinicalblip import __version__
from clinicalblip.config import COMPONENTS, StageConfig
from clinicalblip.data.check import apply_bad_record_policy
from clinicalblip.data.collate import StudyCollator, model_inputs
from clinicalblip.data.manifest import read_manifest
from clinicalblip.errors import UserError
from clinicalblip.model import build_base, fingerprint, is_builtin, is_decoder_only, load_pretrained, torch_dtype
from clinicalblip.prompts import load_template, target_text
from clinicalblip.shapes import full_depth_line
from clinicalblip.stages import (
    apply_trainable,
    component_of,
    core_model,
    format_report,
    load_stage_model,
    read_stage,
    write_stage,
)


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


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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


def _param_groups(model, cfg: StageConfig) -> list[dict]:
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(component_of(name), []).append(p)
    out = []
    for comp in COMPONENTS:
        if comp in groups:
            out.append({"params": groups[comp], "lr": cfg.optim.lr * cfg.optim.lr_mult.get(comp, 1.0), "name": comp})
    return out


def _corpus(records: list[dict]) -> list[str]:
    texts = []
    for r in records:
        for k in ("findings", "impression", "indication", "history", "comparison"):
            if r.get(k):
                texts.append(r[k])
    return texts


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


def train_stage(cfg: StageConfig) -> Path:
    """Train one stage and write its folder. Returns the stage folder path."""
    # Combinations that cannot work are refused before anything is built or loaded.
    if cfg.model.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("model.dtype=fp16 is not supported on CPU: use fp32 (or bf16)")
    if cfg.model.quantization != "none":
        from clinicalblip.model import quantization_config

        quantization_config(cfg.model.quantization, cfg.model.dtype)  # needs a GPU and bitsandbytes
    accelerator = Accelerator(
        # without a GPU, ranks started by `accelerate launch --multi_gpu` / torchrun form a gloo group on CPU
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=_mixed_precision(cfg.model.dtype),
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_dir=cfg.output_dir,
    )
    ds = accelerator.state.deepspeed_plugin
    if cfg.model.quantization != "none" and ds is not None and ds.zero_stage == 3:
        raise UserError(f"model.quantization={cfg.model.quantization} under DeepSpeed ZeRO-3 is not supported here: "
                        "ZeRO-3 would shard the packed quantized weights. Use ZeRO-2 or plain DDP for QLoRA")
    main = accelerator.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    set_seed(cfg.train.seed)
    out_dir = Path(cfg.output_dir)

    # ---- data (read and checked first: a bad manifest should fail before a model loads). The whole
    # manifest is checked, not one split: a patient in two splits is only visible across splits.
    records = read_manifest(cfg.data.manifest)
    records = apply_bad_record_policy(records, cfg.data.on_bad_record, log=log, check_images=cfg.data.check_images)
    train_records = [r for r in records if r["split"] == cfg.data.train_split]
    if cfg.data.limit:
        train_records = train_records[: cfg.data.limit]
    if not train_records:
        raise UserError(f"{cfg.data.manifest}: no usable '{cfg.data.train_split}' records")
    val_records = [r for r in records if r["split"] == cfg.data.val_split][: cfg.data.val_max]
    template = load_template(cfg.data.template)
    empty = [r["id"] for r in train_records if not target_text(template, r)]
    if empty and cfg.data.on_bad_record == "error":
        raise UserError(f"{len(empty)} train record(s) with an empty {template.target}: {', '.join(map(str, empty[:5]))}")
    train_records = [r for r in train_records if target_text(template, r)]

    # ---- model: the parent chain (merged) or the base, then this stage's trainable policy
    if cfg.parent:
        model, processor, chain = load_stage_model(cfg.parent)
        if cfg.model.quantization != "none":
            # Quantization happens at load time: the merged parent is written aside and loaded quantized.
            merged_dir = out_dir / ".parent_merged"
            if main:
                model.save_pretrained(merged_dir)
            accelerator.wait_for_everyone()
            model, _ = load_pretrained(str(merged_dir), dtype=cfg.model.dtype, quantization=cfg.model.quantization)
        parent_info = read_stage(cfg.parent)
        base = dict(chain[0]["base"])
        base["path"] = os.path.relpath(os.path.join(chain[0]["dir"], base["path"]), out_dir.resolve()) \
            if os.path.exists(os.path.join(chain[0]["dir"], base["path"])) else base["path"]
        parent_desc = f"{cfg.parent} ({parent_info['name']})"
    else:
        corpus = _corpus(train_records) if is_builtin(cfg.model.base) else None
        saved_base = out_dir / "base"
        if is_builtin(cfg.model.base) and (saved_base / "config.json").is_file() and cfg.train.resume != "none":
            # A resumed run reuses the base it built (tokenizer training is not bit-reproducible).
            model, processor = load_pretrained(str(saved_base))
        elif cfg.model.quantization != "none" and not is_builtin(cfg.model.base):
            model, processor = load_pretrained(cfg.model.base, dtype=cfg.model.dtype,
                                               trust_remote_code=cfg.model.trust_remote_code,
                                               quantization=cfg.model.quantization)
        elif is_builtin(cfg.model.base):
            # Built once, on the main process, and saved with the stage (the chain stays self-contained);
            # the other ranks load that copy, so every rank holds the very same base and tokenizers.
            if main:
                model, processor = build_base(cfg.model.base, dtype="fp32", corpus=corpus, seed=cfg.train.seed,
                                              layers=cfg.model.layers)
                model.save_pretrained(saved_base)
                processor.save_pretrained(saved_base)
            accelerator.wait_for_everyone()
            if not main:
                model, processor = load_pretrained(str(saved_base))
        else:
            model, processor = build_base(cfg.model.base, dtype="fp32", trust_remote_code=cfg.model.trust_remote_code)
        if is_builtin(cfg.model.base):
            base = {"name": cfg.model.base, "path": "base", "fingerprint": fingerprint(out_dir / "base")}
        else:
            is_dir = os.path.isdir(cfg.model.base)
            base = {"name": cfg.model.base, "path": os.path.abspath(cfg.model.base) if is_dir else cfg.model.base,
                    "fingerprint": fingerprint(cfg.model.base) if is_dir else None}
        parent_desc = "none (base)"
    model.train()
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # with a frozen embedding layer, checkpointed blocks need inputs that require grad (PEFT's note)
        model.enable_input_require_grads()
    model, report = apply_trainable(model, cfg)
    if cfg.model.dtype != "fp32":
        # Frozen weights in the low-precision dtype (half the memory); trainable ones fp32 for the optimizer.
        low = torch_dtype(cfg.model.dtype)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if p.requires_grad else low)

    collate = StudyCollator(
        processor=processor, template=template, num_query_tokens=processor.num_query_tokens,
        decoder_only=is_decoder_only(core_model(model)), mode="train", max_views=cfg.data.max_views,
        max_report_tokens=cfg.data.max_report_tokens, context_dropout=cfg.data.context_dropout, seed=cfg.train.seed,
        image_cache={} if cfg.data.cache_images else None,
    )
    val_collate = StudyCollator(
        processor=processor, template=template, num_query_tokens=processor.num_query_tokens,
        decoder_only=collate.decoder_only, mode="train", max_views=cfg.data.max_views,
        max_report_tokens=cfg.data.max_report_tokens, image_cache=collate.image_cache,
    )
    sampler = EpochSampler(len(train_records), cfg.train.seed)
    train_loader = DataLoader(train_records, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate)
    val_loader = DataLoader(val_records, batch_size=cfg.train.batch_size, shuffle=False, collate_fn=val_collate) \
        if val_records else None

    # ---- optimizer and schedule (optimizer steps, not micro-batches)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_records) / (cfg.train.batch_size * accelerator.num_processes))
                                / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(steps_per_epoch * cfg.train.epochs))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup", optimizer,
        num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    # ---- resume: newest checkpoint (auto) or a given one; data order continues where it stopped
    ckpt_root = out_dir / "checkpoints"
    global_step, start_epoch, skip_batches = 0, 0, 0
    resume_dir = None
    if cfg.train.resume == "auto":
        found = _checkpoint_dirs(ckpt_root)
        resume_dir = found[-1] if found else None
    elif cfg.train.resume not in ("none", ""):
        resume_dir = Path(cfg.train.resume)
        if not (resume_dir / "progress.json").is_file():
            raise UserError(f"train.resume={cfg.train.resume}: not a checkpoint folder (no progress.json)")
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        progress = json.loads((resume_dir / "progress.json").read_text())
        global_step, start_epoch, skip_batches = progress["global_step"], progress["epoch"], progress["batches_in_epoch"]
        log(f"resumed from {resume_dir} at step {global_step} (epoch {start_epoch}, batch {skip_batches})")

    eff_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    log("=" * 78)
    log(f"clinicalblip {__version__} | stage '{cfg.name}' -> {out_dir}")
    log(f"parent: {parent_desc} | base: {base['name']} | template: {template.name} | dtype: {cfg.model.dtype}")
    log(f"train: {len(train_records)} studies, val: {len(val_records)} | effective batch {eff_batch} "
        f"({cfg.train.batch_size} x {cfg.train.grad_accum} accum x {accelerator.num_processes} proc) | "
        f"{total_steps} steps ({num_epochs} epoch(s)) | device {accelerator.device}")
    log(format_report(report))
    log(full_depth_line(accelerator.unwrap_model(model), base["name"], cfg))
    log("=" * 78)

    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    def log_metrics(row: dict) -> None:
        if main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        if cfg.train.report_to != "none":
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=global_step)

    def save_checkpoint(epoch: int, batches_in_epoch: int) -> None:
        # Written aside, then renamed: a crash mid-save never leaves a half checkpoint that 'auto' would pick.
        final = ckpt_root / f"step-{global_step}"
        tmp = ckpt_root / f".tmp-step-{global_step}"
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if main:
            (tmp / "progress.json").write_text(json.dumps(
                {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _checkpoint_dirs(ckpt_root)[: -cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if cfg.train.report_to != "none":
        accelerator.init_trackers(cfg.name, config={"stage": cfg.name})

    # ---- the loop
    model.train()
    best_val, last_val, best_state, best_step = float("inf"), None, None, None
    t_interval, samples_interval, loss_interval, n_interval = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(total=total_steps, initial=global_step, desc=cfg.name, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    done = global_step >= total_steps
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        train_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        collate.epoch = epoch
        loader = train_loader
        batches_in_epoch = 0
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
            batches_in_epoch = skip_batches
        for batch in loader:
            batches_in_epoch += 1
            with accelerator.accumulate(model):
                inputs = model_inputs(batch)
                logits = model(**inputs).logits
                loss_sum, n_tok = token_loss_sum(logits, inputs["labels"], collate.decoder_only)
                # Normalise by the report tokens of this micro-step on ALL ranks: DDP then averages to the
                # same gradient as one process holding the whole batch (a per-rank mean would weight ranks
                # with short reports too much).
                n_global = accelerator.reduce(n_tok.detach().clone(), "sum").clamp(min=1)
                loss = loss_sum * accelerator.num_processes / n_global
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_interval += (loss.detach().float() / accelerator.num_processes).item()
            n_interval += 1
            samples_interval += len(batch["ids"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            bar.update(1)
            if global_step % cfg.train.log_every == 0 or global_step == total_steps:
                dt = time.perf_counter() - t_interval
                row = {"step": global_step, "epoch": epoch, "loss": loss_interval / max(n_interval, 1),
                       "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "samples_per_s": samples_interval / max(dt, 1e-9), "peak_mem_gib": _peak_memory_gib()}
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if main:
                    tqdm.write(f"step {global_step}/{total_steps} | epoch {epoch} | loss {row['loss']:.4f} | "
                               f"lr {row['lr']:.2e} | grad {row['grad_norm'] or 0:.2f} | "
                               f"{row['samples_per_s']:.1f} samples/s | peak {row['peak_mem_gib']:.2f} GiB")
                log_metrics(row)
                t_interval, samples_interval, loss_interval, n_interval = time.perf_counter(), 0, 0.0, 0
            end_of_epoch = batches_in_epoch >= len(train_loader)
            if val_loader is not None and (
                (cfg.train.eval_every and global_step % cfg.train.eval_every == 0)
                or (not cfg.train.eval_every and end_of_epoch)
            ):
                last_val = evaluate_loss(model, val_loader, accelerator)
                if last_val < best_val and cfg.train.select_best:
                    best_state = {n: p.detach().to("cpu", copy=True) for n, p in
                                  accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
                    best_step = global_step
                best_val = min(best_val, last_val)
                log_metrics({"step": global_step, "epoch": epoch, "val_loss": last_val})
                if main:
                    tqdm.write(f"step {global_step} | val_loss {last_val:.4f}")
            if cfg.train.save_every and global_step % cfg.train.save_every == 0 and global_step < total_steps:
                save_checkpoint(epoch if not end_of_epoch else epoch + 1, batches_in_epoch if not end_of_epoch else 0)
            if os.environ.get("CLINICALBLIP_TEST_KILL_AT_STEP") == str(global_step):
                os._exit(137)  # tests: die like a SIGKILL (no cleanup, no stage folder)
            if global_step >= total_steps:
                done = True
                break
    bar.close()
    if val_loader is not None and (last_val is None or cfg.train.eval_every):
        last_val = evaluate_loss(model, val_loader, accelerator)
        best_val = min(best_val, last_val)
        log_metrics({"step": global_step, "val_loss": last_val})

    # ---- the stage folder
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if cfg.train.select_best and best_state is not None and last_val is not None and best_val < last_val:
        with torch.no_grad():
            for n, p in unwrapped.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
        log(f"select_best: writing the weights of step {best_step} (val_loss {best_val:.4f} < final {last_val:.4f})")
        last_val = best_val
    if main:
        metrics = {"val_loss": last_val, "best_val_loss": best_val if best_val < float("inf") else None,
                   "best_step": best_step, "steps": global_step, "train_studies": len(train_records)}
        write_stage(out_dir, unwrapped, processor, cfg, template, report, base=base,
                    parent=os.path.abspath(cfg.parent) if cfg.parent else None, metrics=metrics,
                    data_hash=_file_hash(cfg.data.manifest))
        log(f"stage '{cfg.name}' written to {out_dir} (val_loss {last_val if last_val is None else round(last_val, 4)})")
    accelerator.wait_for_everyone()
    if main and (out_dir / ".parent_merged").exists():
        shutil.rmtree(out_dir / ".parent_merged", ignore_errors=True)
    if cfg.train.report_to != "none":
        accelerator.end_training()
    return out_dir
