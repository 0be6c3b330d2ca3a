"""Build or load InstructBLIP + processor: the tiny and shape presets, a local checkpoint folder, or a hub id."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

from clinicalblip.errors import UserError
from clinicalblip.shapes import SHAPE_PRESETS, build_shape_model, build_shape_processor
from clinicalblip.tiny import TINY_PRESETS, build_tiny_model, build_tiny_processor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def is_tiny(base: str) -> bool:
    return base in TINY_PRESETS


def is_builtin(base: str) -> bool:
    """A base built in code (tiny or shape preset): a stage saves it, so its chain stays self-contained."""
    return base in TINY_PRESETS or base in SHAPE_PRESETS


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create floating-point tensors in `dtype` inside the block (torch's process-wide default, restored after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_base(base: str, dtype: str = "fp32", corpus: list[str] | None = None, seed: int = 0,
               trust_remote_code: bool = False, layers: int = 0):
    """Return (model, processor) for a base: 'tiny'/'tiny-t5', 'shape-*', a local folder, or a hub id."""
    if layers and base not in SHAPE_PRESETS:
        raise UserError(f"model.layers={layers} applies to the shape presets ({', '.join(SHAPE_PRESETS)}) only, "
                        f"not to '{base}'; use model.layers=0")
    if is_tiny(base):
        processor = build_tiny_processor(base, corpus=corpus)
        with default_dtype(torch_dtype(dtype)):  # created in `dtype`: no fp32 copy first
            model = build_tiny_model(processor, base, seed=seed)
        return model, processor
    if base in SHAPE_PRESETS:
        processor = build_shape_processor(base, corpus=corpus)
        return build_shape_model(base, layers=layers, seed=seed, dtype=torch_dtype(dtype)), processor
    return load_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)


def quantization_config(quantization: str, dtype: str):
    """bitsandbytes config quantizing the language model only (vision, Q-Former, projection, lm_head stay).

    bitsandbytes >= 0.49 runs 4-bit NF4 and 8-bit on the CPU too, so QLoRA trains without a GPU (slowly).
    """
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"quantization {quantization} needs bitsandbytes: pip install 'clinicalblip[gpu]'") from None
    if dtype == "fp32":
        raise UserError(f"quantization {quantization} computes in bf16/fp16: use dtype bf16")
    from transformers import BitsAndBytesConfig

    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(dtype), bnb_4bit_quant_storage=torch_dtype(dtype),
                              llm_int8_skip_modules=skip)


def _device_map() -> dict:
    return {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}


def _plain_cpu_4bit(model):
    """Keep 4-bit weights in the standard layout on CPU.

    bitsandbytes' CPU inference fast path repacks a Linear4bit weight in place on its first eval forward; the
    repacked layout needs in_features divisible by the block size and is not what merge/save expect.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return model
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def quantize_from_model(model, quantization: str, dtype: str):
    """The same weights with the language model quantized, in memory (no full-precision copy on disk)."""
    qcfg = quantization_config(quantization, dtype)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    qmodel = InstructBlipForConditionalGeneration.from_pretrained(
        None, config=model.config, state_dict=state, quantization_config=qcfg, device_map=_device_map(),
        dtype=torch_dtype(dtype))
    qmodel.generation_config = model.generation_config
    return _plain_cpu_4bit(qmodel)


def load_pretrained(path_or_id: str, dtype: str = "fp32", trust_remote_code: bool = False,
                    quantization: str = "none", fp32_components: tuple[str, ...] = ()):
    """Load model + processor from a folder or hub id (weights through safetensors only).

    The weights arrive in `dtype` directly (never a full fp32 copy first). `fp32_components` (e.g. the parts a
    stage trains `full`) are then read again from the checkpoint in fp32, so the optimizer starts from their
    stored values rather than from a bf16 rounding of them.
    """
    local = Path(path_or_id)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{path_or_id}: not an InstructBLIP checkpoint folder (no config.json)")
    if not local.exists() and hub_offline():
        # Offline, a hub id means the snapshot the cache's refs/main names: resolved here, the same way
        # describe_base pins it, so what is loaded is what the stage records.
        snap = hub_snapshot(path_or_id)
        if snap is not None:
            path_or_id = str(snap)
    qcfg = quantization_config(quantization, dtype)
    extra = {"quantization_config": qcfg, "device_map": _device_map()} if qcfg else {}
    try:
        model = InstructBlipForConditionalGeneration.from_pretrained(
            path_or_id, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code, **extra
        )
        processor = InstructBlipProcessor.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except OSError as exc:
        hint = "" if local.exists() else " (not a local folder; hub ids need network access and HF_HUB_OFFLINE unset)"
        raise UserError(f"cannot load model '{path_or_id}'{hint}: {str(exc).splitlines()[0]}") from None
    if fp32_components and dtype != "fp32":
        restore_fp32(model, checkpoint_folder(path_or_id), fp32_components)
    return _plain_cpu_4bit(model) if qcfg else model, processor


def checkpoint_folder(path_or_id: str) -> Path | None:
    """The local folder holding a checkpoint's weight files: the folder itself or a hub id's cached snapshot."""
    local = Path(path_or_id)
    return local if local.is_dir() else hub_snapshot(path_or_id)


def _weight_files(folder: Path | None) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder is not None else []


def restore_fp32(model, folder: Path | None, components: tuple[str, ...]) -> int:
    """Make every parameter of `components` fp32, read from the checkpoint's safetensors where it is stored.

    Only those tensors are read (safe_open, one at a time); a parameter the checkpoint lacks is upcast.
    Returns how many tensors came from the checkpoint.
    """
    from safetensors import safe_open

    own = {n: p for n, p in model.named_parameters() if n.split(".", 1)[0] in components}
    restored = 0
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                p = own.get(key)
                if p is None or p.dtype == torch.float32:
                    continue
                t = fh.get_tensor(key)
                if tuple(t.shape) == tuple(p.shape) and t.is_floating_point():
                    p.data = t.to(torch.float32)
                    restored += 1
    for p in own.values():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
    return restored


SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def stored_dtype(path_or_id: str) -> str | None:
    """The dtype most of a checkpoint's floating-point weights are stored in (None when it cannot be read).

    Read from the safetensors headers only (no tensor is loaded).
    """
    sizes: dict[str, int] = {}
    for f in _weight_files(checkpoint_folder(path_or_id)):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for key, entry in header.items():
            if key != "__metadata__" and entry.get("dtype") in SAFETENSORS_DTYPES:
                start, end = entry["data_offsets"]
                name = SAFETENSORS_DTYPES[entry["dtype"]]
                sizes[name] = sizes.get(name, 0) + end - start
    return max(sizes, key=sizes.get) if sizes else None


def is_decoder_only(model) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "use_decoder_only_language_model", True))


def fingerprint(folder: str | os.PathLike) -> str:
    """A cheap, stable hash of a checkpoint folder: config + every weight file's name, size and edges.

    Reading 14 GB to hash a 7B base on every chain load would be too slow; names, sizes and the first and
    last MiB of each weight file catch a different or altered base in practice.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (2 << 20):
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- hub bases
def hub_offline() -> bool:
    """HF_HUB_OFFLINE set (scripts/venv.sh sets it): the hub must not be contacted."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def require_hub_online(action: str) -> None:
    """Refuse an action that needs the hub while HF_HUB_OFFLINE is set, saying how to allow it."""
    if hub_offline():
        raise UserError(f"{action} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set (scripts/venv.sh sets "
                        "it): run it with HF_HUB_OFFLINE=0 after `huggingface-cli login`, or upload the folder "
                        "yourself later")


def hub_cache_dir() -> str:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder (`snapshots/<commit>`) of a hub model, or None when it is not cached.

    revision None follows the cache's refs/main (what an offline load resolves to); a commit hash names one
    snapshot. Never touches the network.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        got = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    except Exception:  # not a valid repo id (e.g. a mistyped local path): nothing cached under it
        return None
    return Path(got).parent if isinstance(got, str) else None


def describe_base(base: str) -> dict:
    """The `base` record of a root stage: local folder (absolute path + fingerprint) or hub id pinned to the
    resolved commit of its cached snapshot and that folder's fingerprint."""
    if os.path.isdir(base):
        return {"name": base, "path": os.path.abspath(base), "fingerprint": fingerprint(base)}
    snap = hub_snapshot(base)
    return {"name": base, "path": base, "revision": snap.name if snap else None,
            "fingerprint": fingerprint(snap) if snap else None}


def pinned_hub_base(base: dict, stage: str) -> str | None:
    """The snapshot folder of the revision a chain's hub base was pinned to (None: not a pinned hub base).

    The recorded commit is loaded even when refs/main has moved on; when that snapshot is gone, the load
    stops naming both revisions (the caller then checks the folder's fingerprint against the record).
    """
    revision, repo_id = base.get("revision"), base.get("path") or base.get("name")
    if not revision or not repo_id:
        return None
    pinned = hub_snapshot(repo_id, revision=revision)
    if pinned is not None:
        return str(pinned)
    current = hub_snapshot(repo_id)
    fetch = f"`huggingface-cli download {repo_id} --revision {revision}`"
    if current is None:
        raise UserError(f"base model {repo_id} revision {revision} (stage '{stage}') is not in the hub cache "
                         f"{hub_cache_dir()}: fetch it with {fetch}")
    raise UserError(f"base model {repo_id} now resolves to revision {current.name}, but stage '{stage}' was "
                     f"trained on revision {revision}: fetch that revision with {fetch}, or retrain the chain on "
                     f"{current.name}")
