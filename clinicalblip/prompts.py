"""Prompt templates: data files in prompts/, rendered by one function for training and generation.

A template is a YAML file with a `prompt` (the text given to the LLM after the image tokens) and
optionally a `qformer` instruction (defaults to the same text, as InstructBLIP feeds one instruction
to both). Slots are written `{name}`. A line whose slots are all empty is dropped, so missing context
disappears cleanly instead of leaving "Indication: " behind. Imports nothing of the project.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The uninformative indication of the "generic" context ablation (and one of the synthetic data's routine
# phrases): what a request with no clinical question looks like.
GENERIC_INDICATION = "Routine chest radiograph."

KNOWN_SLOTS = ("indication", "history", "comparison", "views", "age", "sex", "hints", "prior")
TARGETS = ("findings", "impression", "findings_impression")
_SLOT_RE = re.compile(r"\{(\w+)\}")


class TemplateError(ValueError):
    """Unknown template or slot, or a malformed template file."""


@dataclass
class Template:
    name: str
    prompt: str
    qformer: str | None = None
    target: str = "findings"
    description: str = ""
    slots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "target": self.target, "slots": self.slots,
             "prompt": self.prompt}
        if self.qformer is not None:
            d["qformer"] = self.qformer
        return d


@dataclass
class Rendered:
    prompt: str
    qformer_prompt: str


def prompts_dir() -> Path:
    """The shipped templates, clinicalblip/templates/ (package data; the repo's prompts/ links to it).

    CLINICALBLIP_PROMPTS overrides."""
    env = os.environ.get("CLINICALBLIP_PROMPTS")
    return Path(env) if env else Path(__file__).resolve().parent / "templates"


def _slots_of(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def template_from_dict(data: dict, where: str = "template") -> Template:
    if not isinstance(data, dict) or "prompt" not in data or "name" not in data:
        raise TemplateError(f"{where}: a template needs at least 'name' and 'prompt'")
    known = {"name", "prompt", "qformer", "target", "description", "slots"}
    extra = sorted(set(data) - known)
    if extra:
        raise TemplateError(f"{where}: unknown key '{extra[0]}' (known: {', '.join(sorted(known))})")
    tpl = Template(
        name=str(data["name"]), prompt=str(data["prompt"]).rstrip("\n"),
        qformer=None if data.get("qformer") is None else str(data["qformer"]).rstrip("\n"),
        target=str(data.get("target", "findings")), description=str(data.get("description", "")),
        slots=list(data.get("slots") or []),
    )
    used = set(_slots_of(tpl.prompt)) | set(_slots_of(tpl.qformer or ""))
    unknown = sorted(used - set(KNOWN_SLOTS))
    if unknown:
        raise TemplateError(f"{where}: unknown slot '{{{unknown[0]}}}' (known slots: {', '.join(KNOWN_SLOTS)})")
    undeclared = sorted(used - set(tpl.slots))
    if undeclared:
        raise TemplateError(f"{where}: slot '{{{undeclared[0]}}}' is used but not declared in 'slots'")
    if tpl.target not in TARGETS:
        raise TemplateError(f"{where}: target must be one of {', '.join(TARGETS)}")
    return tpl


def available_templates(folder: str | os.PathLike | None = None) -> list[str]:
    folder = Path(folder) if folder else prompts_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_template(name_or_path: str, folder: str | os.PathLike | None = None) -> Template:
    """Load a template by name (from prompts/) or by path to a .yaml file."""
    path = Path(name_or_path)
    if not (path.suffix == ".yaml" and path.is_file()):
        folder = Path(folder) if folder else prompts_dir()
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            avail = available_templates(folder)
            raise TemplateError(
                f"unknown template '{name_or_path}' (available: {', '.join(avail) or 'none found in ' + str(folder)})"
            )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise TemplateError(f"{path}: invalid YAML") from None
    return template_from_dict(data, where=str(path))


def _fmt_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    return str(value).strip()


def _render_text(text: str, values: dict[str, str]) -> str:
    lines = []
    for line in text.split("\n"):
        names = _SLOT_RE.findall(line)
        if names and all(not values.get(n) for n in names):
            continue  # every slot on this line is empty: drop the line
        lines.append(_SLOT_RE.sub(lambda m: values.get(m.group(1), ""), line))
    return "\n".join(lines).strip()


def render(template: Template, context: dict | None = None) -> Rendered:
    """Render the LLM prompt and Q-Former instruction for one study.

    context: slot -> value (str, list of str, or None). Keys that are not slots of the template are an
    error (they would be silently ignored otherwise); empty values drop their line.
    """
    context = context or {}
    unknown = sorted(k for k in context if k not in KNOWN_SLOTS)
    if unknown:
        raise TemplateError(f"unknown slot '{unknown[0]}' (known slots: {', '.join(KNOWN_SLOTS)})")
    values = {k: _fmt_value(v) for k, v in context.items() if k in template.slots}
    prompt = _render_text(template.prompt, values)
    qformer = _render_text(template.qformer, values) if template.qformer is not None else prompt
    return Rendered(prompt=prompt, qformer_prompt=qformer)


def target_text(template: Template, record: dict) -> str:
    """The text a template teaches the model to write, from a manifest record."""
    f = (record.get("findings") or "").strip()
    i = (record.get("impression") or "").strip()
    if template.target == "findings":
        return f
    if template.target == "impression":
        return i
    parts = []
    if f:
        parts.append(f"FINDINGS: {f}")
    if i:
        parts.append(f"IMPRESSION: {i}")
    return " ".join(parts)
