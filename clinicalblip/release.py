"""The release folder format: what `merge` writes and `generate` / `serve` read.

    config.json, model*.safetensors   InstructBlipForConditionalGeneration (plain transformers loads it)
    processor files                   InstructBlipProcessor (both tokenizers, image processor)
    generation_config.json            greedy decoding, max_new_tokens = the stage's max_report_tokens
    prompts/<template>.yaml           the prompt template the stages were trained with
    clinicalblip.json                 provenance: stages, base, template, max_views, dtype, verification
    README.md                         the model card
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from clinicalblip.errors import UserError
from clinicalblip.prompts import Template, template_from_dict

RELEASE_META = "clinicalblip.json"
RELEASE_FORMAT = "clinicalblip-release/1"


def is_release_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "stage.json").is_file()


def read_release(path: str | os.PathLike) -> dict:
    """The release's clinicalblip.json ({} for a plain transformers checkpoint without one)."""
    f = Path(path) / RELEASE_META
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{f}: corrupted release metadata (not JSON); merge the stage chain again") from None


def release_template(path: str | os.PathLike, meta: dict | None = None) -> Template | None:
    """The prompt template shipped with a release (None when it names none)."""
    meta = read_release(path) if meta is None else meta
    name = meta.get("template")
    tfile = Path(path) / "prompts" / f"{name}.yaml"
    if not name or not tfile.is_file():
        return None
    return template_from_dict(yaml.safe_load(tfile.read_text(encoding="utf-8")), str(tfile))


def write_release_files(folder: Path, template: Template, meta: dict, card: str) -> None:
    (folder / "prompts").mkdir(exist_ok=True)
    (folder / "prompts" / f"{template.name}.yaml").write_text(
        yaml.safe_dump(template.to_dict(), sort_keys=False), encoding="utf-8")
    (folder / RELEASE_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")
