"""The stage folder format (writer and reader) and loading a chain of stages; the trainable policy is policy.py.

A stage folder is self-describing:

    stage.json          name, parent (relative path), base (path/id + fingerprint), trainable report,
                        template, data hash, code version, metrics
    config.yaml         the resolved stage config
    template.yaml       the prompt template the stage was trained with
    adapter/            PEFT LoRA adapter (only when some component is `lora`)
    trained.safetensors weights of the components trained `full`
    processor/          InstructBLIP processor (both tokenizers, image processor, num_query_tokens)
    base/               the base model itself, when it was built in code (tiny presets)
    checkpoints/        resumable training state (accelerate), not needed for inference

Loading a chain: the base, then for each stage in order its `full` weights and its LoRA merged in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file

from clinicalblip import __version__
from clinicalblip.config import COMPONENTS, StageConfig
from clinicalblip.errors import UserError
from clinicalblip.filemode import give_umask_mode
from clinicalblip.model import fingerprint, load_pretrained, pinned_hub_base
from clinicalblip.policy import component_of, core_model
from clinicalblip.prompts import Template, template_from_dict

STAGE_FORMAT = "clinicalblip-stage/1"


class StageError(UserError):
    """A stage folder or chain that cannot be used."""


# ---------------------------------------------------------------------------------------------- folders
STAGE_FILES = ("stage.json", "config.yaml", "template.yaml", "adapter", "trained.safetensors", "processor")


def _strip_peft(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def split_trainable_state(model, cfg: StageConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA tensors keyed as PEFT saves them, `full` component tensors keyed as in InstructBLIP)."""
    full_comps = {c for c in COMPONENTS if getattr(cfg.trainable, c) == "full"}
    lora, full = {}, {}
    for name, t in state.items():
        if "lora_" in name:
            lora[name] = t
            continue
        key = _strip_peft(name)
        if component_of(key) not in full_comps:
            raise StageError(f"internal: trainable parameter {name} belongs to no lora/full component")
        if ".base_layer." in key:
            raise StageError(f"internal: full component parameter {name} is wrapped by LoRA")
        full[key] = t.contiguous()
    if lora:
        from peft.utils import get_peft_model_state_dict

        lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=lora).items()}
    return lora, full


def write_stage(out_dir: str | os.PathLike, model, processor, cfg: StageConfig, template: Template, report: dict,
                base: dict, parent: str | None, metrics: dict | None = None, data_hash: str | None = None,
                trainable_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the stage folder from the trainable weights (`trainable_state`, e.g. gathered under ZeRO-3).

    The folder is assembled in a temporary sibling and swapped in: files of an earlier stage written to the
    same folder (an adapter, full weights) cannot survive, and a crash leaves the old stage intact.
    Training state beside the stage (checkpoints/, base/, metrics.jsonl, trackers) is carried over.
    """
    out = Path(out_dir)
    if trainable_state is None:
        trainable_state = {n: p.detach().to("cpu", torch.float32, copy=True)
                           for n, p in model.named_parameters() if p.requires_grad}
    lora, full = split_trainable_state(model, cfg, trainable_state)
    has_adapter = isinstance(model, PeftModel)
    if has_adapter != bool(lora):
        raise StageError(f"internal: adapter model={has_adapter} but {len(lora)} LoRA tensors")
    tmp = out.parent / f".{out.name}.writing"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if has_adapter:
        (tmp / "adapter").mkdir()
        model.peft_config["default"].save_pretrained(str(tmp / "adapter"))
        save_file(lora, str(tmp / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    if full:
        save_file(full, str(tmp / "trained.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(tmp / "processor")
    give_umask_mode(tmp)  # safetensors writes 0600: readable by others as every other stage file is
    (tmp / "template.yaml").write_text(yaml.safe_dump(template.to_dict(), sort_keys=False), encoding="utf-8")
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    info = {
        "format": STAGE_FORMAT,
        "name": cfg.name,
        "parent": os.path.relpath(parent, out) if parent else None,
        "base": base,
        "trainable": report,
        "template": template.name,
        "has_adapter": has_adapter,
        "full_components": sorted({component_of(k) for k in full}),
        "data_hash": data_hash,
        "code_version": __version__,
        "metrics": metrics or {},
    }
    (tmp / "stage.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if out.exists():
        for entry in out.iterdir():  # training state stays with the stage; old stage files do not
            if entry.name not in STAGE_FILES:
                os.replace(entry, tmp / entry.name)
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def is_stage_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "stage.json").is_file()


def read_stage(stage_dir: str | os.PathLike) -> dict:
    d = Path(stage_dir)
    f = d / "stage.json"
    if not f.is_file():
        raise StageError(f"{d}: not a stage folder (no stage.json)")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise StageError(f"{f}: corrupted stage.json") from None
    info["dir"] = str(d.resolve())
    return info


def stage_chain(stage_dir: str | os.PathLike) -> list[dict]:
    """Stages from the root to this one; a missing parent is a broken chain."""
    chain = [read_stage(stage_dir)]
    seen = {chain[0]["dir"]}
    while chain[0].get("parent"):
        parent = os.path.normpath(os.path.join(chain[0]["dir"], chain[0]["parent"]))
        if not is_stage_dir(parent):
            raise StageError(
                f"broken stage chain: {chain[0]['dir']} names parent {parent}, which is not a stage folder"
            )
        if parent in seen:
            raise StageError(f"stage chain loops at {parent}")
        seen.add(parent)
        chain.insert(0, read_stage(parent))
    return chain


def base_location(chain: list[dict]) -> str:
    """The base model path (resolved against the root stage folder) or hub id."""
    root = chain[0]
    loc = root["base"]["path"]
    candidate = os.path.normpath(os.path.join(root["dir"], loc))
    return candidate if os.path.exists(candidate) else (pinned_hub_base(root["base"], root["name"]) or loc)


def load_template_of(stage_dir: str | os.PathLike) -> Template:
    import yaml as _yaml

    path = Path(stage_dir) / "template.yaml"
    return template_from_dict(_yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path))


def _apply_full(model, stage: dict):
    """Copy one stage's fully trained components in, as its stage.json lists them (nothing else found)."""
    d = Path(stage["dir"])
    full_comps = stage.get("full_components") or []
    full = d / "trained.safetensors"
    if full_comps:
        if not full.is_file():
            raise StageError(f"{d}: stage.json lists fully trained {', '.join(full_comps)} but "
                             f"trained.safetensors is missing; retrain the stage or restore the file")
        try:
            sd = load_file(str(full))
        except Exception as exc:
            raise StageError(f"{full}: corrupted weights file ({exc})") from None
        core = core_model(model)
        own = dict(core.named_parameters())
        unknown = [k for k in sd if k not in own]
        if unknown:
            raise StageError(f"{full}: weights do not fit this model (e.g. '{unknown[0]}')")
        foreign = sorted({component_of(k) for k in sd} - set(full_comps))
        if foreign:
            raise StageError(f"{full}: holds {', '.join(foreign)}, which stage.json does not list as trained; "
                             "the folder mixes two stages: retrain it")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v.to(own[k].dtype))
    return model


def _apply_adapter(model, stage: dict, merge: bool):
    """Add one stage's LoRA adapter when its stage.json says it has one; merged in, or left live."""
    d = Path(stage["dir"])
    if stage.get("has_adapter"):
        if not (d / "adapter").is_dir():
            raise StageError(f"{d}: stage.json says the stage has a LoRA adapter but adapter/ is missing")
        try:
            model = PeftModel.from_pretrained(model, str(d / "adapter"), is_trainable=False)
        except Exception as exc:
            raise StageError(f"{d / 'adapter'}: cannot load the LoRA adapter ({str(exc).splitlines()[0]})") from None
        if merge:
            model = model.merge_and_unload()
    return model


def _apply_stage(model, stage: dict, merge: bool):
    return _apply_adapter(_apply_full(model, stage), stage, merge)


def check_base(chain: list[dict], base_path: str) -> None:
    expected = chain[0]["base"].get("fingerprint")
    if expected and os.path.isdir(base_path):
        got = fingerprint(base_path)
        if got != expected:
            raise StageError(
                f"base model at {base_path} differs from the one stage '{chain[0]['name']}' was trained on "
                f"(fingerprint {got} != {expected})"
            )


def load_stage_model(stage_dir: str | os.PathLike, dtype: str = "fp32", keep_last_unmerged: bool = False,
                     quantization: str = "none", fp32_components: tuple[str, ...] = ()):
    """Load base + every stage of the chain. Returns (model, processor, chain).

    The base is loaded in `dtype` and every stage is applied in it (LoRA merged module by module): no fp32 copy
    of a bf16 chain exists at any time. `fp32_components` stay fp32 (a child stage's fully trained parts: the
    base's stored values, then each stage's fp32 weights copied in at full precision); otherwise the whole
    model ends in `dtype`, a live last adapter included.
    With keep_last_unmerged, the last stage's LoRA stays a live adapter (a PeftModel): the 'adapter chain'
    that merge checks compare against. With quantization (4bit | 8bit), the chain is loaded as a QLoRA stage
    trained on it: everything before the last stage's adapter merged in the compute dtype (bf16 when fp32 is
    asked), quantized in memory, and the last adapter live on top.
    """
    chain = stage_chain(stage_dir)
    base = base_location(chain)
    check_base(chain, base)
    compute = ("bf16" if dtype == "fp32" else dtype) if quantization != "none" else dtype
    model, _ = load_pretrained(base, dtype=compute, fp32_components=fp32_components)
    for i, st in enumerate(chain):
        if i < len(chain) - 1:
            model = _apply_stage(model, st, merge=True)
    last = chain[-1]
    if quantization != "none":
        from clinicalblip.model import quantize_from_model

        model = quantize_from_model(_apply_full(model, last), quantization, compute)
        model = _apply_adapter(model, last, merge=False)
    else:
        model = _apply_stage(model, last, merge=not keep_last_unmerged)
    from transformers import InstructBlipProcessor

    processor = InstructBlipProcessor.from_pretrained(Path(chain[-1]["dir"]) / "processor")
    if dtype != "fp32" and quantization == "none" and not fp32_components:
        from clinicalblip.model import torch_dtype

        model = model.to(torch_dtype(dtype))  # a live adapter's LoRA weights; the rest is in dtype already
    model.eval()
    return model, processor, chain
