"""The per-component trainable policy: frozen | lora | full for vision_model, qformer, query_tokens,
language_projection and language_model, the LoRA targets per architecture, and the report logged at start."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from clinicalblip.config import COMPONENTS, StageConfig
from clinicalblip.errors import UserError

DEFAULT_TARGETS = {
    "vision_model": ["qkv", "projection", "fc1", "fc2"],
    "qformer": ["query", "key", "value", "dense"],
    "language_projection": [],  # the Linear itself
}
LM_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}


def core_model(model):
    """The InstructBLIP module underneath a PeftModel (LoRA layers injected in place) or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def component_of(param_name: str) -> str:
    name = param_name
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.split(".", 1)[0]


def _lm_targets(model) -> list[str]:
    mtype = getattr(model.config.text_config, "model_type", "")
    if mtype in LM_TARGETS:
        return LM_TARGETS[mtype]
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_target_regex(model, cfg: StageConfig) -> tuple[str, dict, dict, dict]:
    """Regex over module names for every `lora` component + per-component rank/alpha/dropout patterns."""
    parts, rank, alpha, dropout = [], {}, {}, {}
    for comp in COMPONENTS:
        if getattr(cfg.trainable, comp) != "lora":
            continue
        spec = getattr(cfg.lora, comp)
        targets = spec.targets or (_lm_targets(model) if comp == "language_model" else DEFAULT_TARGETS[comp])
        if targets:
            pat = rf"{comp}(?:\..*)?\.(?:{'|'.join(re.escape(t) for t in targets)})"
        else:
            pat = re.escape(comp)
        parts.append(pat)
        key = rf"{comp}(?:\..*)?" if targets else re.escape(comp)
        rank[key], alpha[key], dropout[comp] = spec.r, spec.alpha, spec.dropout
    return "|".join(f"(?:{p})" for p in parts), rank, alpha, dropout


def _linear_names(model, comp: str) -> list[tuple[str, str]]:
    """(module name, leaf name) of every Linear layer of one component (LoRA's targets)."""
    return [(name, name.rsplit(".", 1)[-1]) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (name == comp or name.startswith(comp + "."))]


def check_lora_targets(model, cfg: StageConfig) -> None:
    """Refuse a `lora` component whose targets match none of its Linear layers, naming the ones that exist.

    PEFT only complains when no target matches anywhere: with another component matching, the dead one would
    train nothing while the stage still says `lora`.
    """
    for comp in COMPONENTS:
        if getattr(cfg.trainable, comp) != "lora":
            continue
        spec = getattr(cfg.lora, comp)
        targets = spec.targets or (_lm_targets(model) if comp == "language_model" else DEFAULT_TARGETS[comp])
        pat = re.compile(rf"{comp}(?:\..*)?\.(?:{'|'.join(re.escape(t) for t in targets)})" if targets
                         else re.escape(comp))
        linears = _linear_names(model, comp)
        if any(pat.fullmatch(name) for name, _ in linears):
            continue
        exist = sorted(set(leaf for _, leaf in linears))
        given = ", ".join(targets) if targets else f"the {comp} module itself"
        raise UserError(f"lora.{comp}.targets [{given}] match none of the Linear layers of {comp}, so "
                        f"trainable.{comp}=lora would train nothing. Its Linear layers are: "
                        f"{', '.join(exist) or 'none'} (set lora.{comp}.targets to some of them)")


def check_trainable(report: dict) -> None:
    """Refuse a `lora` or `full` component that ended up with 0 trainable parameters."""
    for comp in COMPONENTS:
        r = report.get(comp) or {}
        if r.get("policy") in ("lora", "full") and not r.get("trainable"):
            raise UserError(f"trainable.{comp}={r['policy']} but {comp} has 0 trainable parameters "
                            f"({r.get('frozen', 0):,} frozen): nothing of it would train. Check trainable.{comp} "
                            f"and lora.{comp}.targets")


def apply_trainable(model, cfg: StageConfig):
    """Freeze everything, then add LoRA / unfreeze per component. Returns (model, report).

    The returned model is a PeftModel when some component is `lora` (call `core_model()` for the
    InstructBLIP module that runs forward/generate), else the input model.
    """
    model.requires_grad_(False)
    check_lora_targets(model, cfg)
    regex, rank, alpha, dropout = lora_target_regex(model, cfg)
    if regex:
        first = next(iter(rank))
        lcfg = PeftLoraConfig(
            target_modules=regex, r=rank[first], lora_alpha=alpha[first], rank_pattern=rank, alpha_pattern=alpha,
            lora_dropout=max(dropout.values()), bias="none",
        )
        model = get_peft_model(model, lcfg)
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_dropout:
                p = dropout[component_of(name)]
                module.lora_dropout["default"] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
        if cfg.lora.init == "gaussian":
            # Non-identity start (tests): with lora_B = 0 a merged model equals the base trivially.
            g = torch.Generator().manual_seed(cfg.train.seed + 1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    with torch.no_grad():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    core = core_model(model)
    for comp in COMPONENTS:
        if getattr(cfg.trainable, comp) == "full":
            target = getattr(core, comp)
            if isinstance(target, torch.nn.Parameter):
                target.requires_grad_(True)
            else:
                target.requires_grad_(True)
    report = trainable_report(model, cfg)
    check_trainable(report)
    return model, report


def trainable_report(model, cfg: StageConfig) -> dict:
    report = {}
    for comp in COMPONENTS:
        report[comp] = {"policy": getattr(cfg.trainable, comp), "trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        comp = component_of(name)
        if comp not in report:
            continue
        # a ZeRO-3 partitioned parameter holds 1/N (or nothing) here; ds_numel is its real size
        report[comp]["trainable" if p.requires_grad else "frozen"] += getattr(p, "ds_numel", p.numel())
    report["total"] = {
        "trainable": sum(v["trainable"] for v in report.values()),
        "frozen": sum(v["frozen"] for v in report.values()),
    }
    return report


def format_report(report: dict) -> str:
    lines = [f"{'component':<20} {'policy':<7} {'trainable':>12} {'frozen':>12}"]
    for comp, r in report.items():
        lines.append(f"{comp:<20} {r.get('policy', ''):<7} {r['trainable']:>12,} {r['frozen']:>12,}")
    return "\n".join(lines)
