"""What clinicalblip does about third-party packages that act at import time.

clinicalblip makes no network connection unless the user asks for one (a hub id, ``--push-to-hub``,
``metrics fetch``). Two dependencies act on their own as soon as they are imported, so this module, imported
first by ``clinicalblip/__init__.py``, narrows exactly those two behaviours and nothing else:

- **bitsandbytes >= 0.50** (imported by peft whenever it is installed, so by every command) calls
  ``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` at import on CPUs with AVX512-BF16.
  That downloads and runs code from the Hugging Face hub (online), or prints two lines about failing to
  (offline). While bitsandbytes' CPU backend module executes, and only then, the name ``kernels`` resolves to
  a stand-in whose ``get_kernel`` refuses; bitsandbytes then keeps its own CPU kernels (what it does offline),
  and the one warning it logs about the refusal is dropped. Nothing else sees the stand-in: transformers and
  user code import the real ``kernels`` package. ``CLINICALBLIP_HUB_KERNELS=1`` lets bitsandbytes fetch the
  hub kernel as it would without clinicalblip.
- **DeepSpeed** warns "Setting accelerator to CPU" at import when no GPU is present. On a CPU-only build of
  PyTorch the user cannot act on it, so that one record is dropped there (with a CUDA build it stays: a GPU
  that PyTorch cannot see is worth a line).

When stderr is not a terminal, the Hugging Face progress bars are turned off as clinicalblip's own are
(``HF_HUB_DISABLE_PROGRESS_BARS``, unless the user set it), so a log file gets no carriage returns.

Warnings are not filtered globally: PEFT's and DeepSpeed's real messages still show. If bitsandbytes was
imported before clinicalblip (``import peft`` first in a user's script), the guard cannot act; import
clinicalblip first, or set ``CLINICALBLIP_HUB_KERNELS``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import types

_BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"
_REFUSAL = "clinicalblip keeps hub kernels off"


def _refusing_kernels_module() -> types.ModuleType:
    module = types.ModuleType("kernels")

    def get_kernel(repo_id, *args, **kwargs):
        raise RuntimeError(f"{_REFUSAL} ({repo_id}); set CLINICALBLIP_HUB_KERNELS=1 to allow the download")

    module.get_kernel = get_kernel
    return module


class _BnbCpuOpsFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes' CPU backend module once and runs it with ``kernels`` standing in."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _BNB_CPU_OPS:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from coming back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            missing = object()
            real = sys.modules.get("kernels", missing)
            sys.modules["kernels"] = _refusing_kernels_module()
            try:
                run_module(module)
            finally:
                if real is missing:
                    sys.modules.pop("kernels", None)
                else:
                    sys.modules["kernels"] = real

        spec.loader.exec_module = exec_module
        return spec


class _DropRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self.text not in record.getMessage()
        except Exception:
            return True


def _cpu_only_torch() -> bool:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    # torch/version.py is read without importing torch (importing it here would slow every command)
    version_py = os.path.join(os.path.dirname(spec.origin), "version.py")
    try:
        with open(version_py, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return False
    def built_for(name: str) -> bool:
        match = re.search(rf"^{name}\b[^=\n]*=\s*(.+)$", text, re.M)
        return bool(match) and match.group(1).strip() != "None"

    return not built_for("cuda") and not built_for("hip")


def install() -> None:
    from clinicalblip.progress import mode

    if mode() != "bar":
        # transformers' and the hub's own bars ("Loading weights", "Writing model shards") follow ours: in a log
        # file they are carriage-return walls (see clinicalblip/progress.py); on a terminal they stay.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("CLINICALBLIP_HUB_KERNELS", "").lower() not in ("1", "true", "yes", "on"):
        if _BNB_CPU_OPS not in sys.modules and not any(isinstance(f, _BnbCpuOpsFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _BnbCpuOpsFinder())
        logging.getLogger(_BNB_CPU_OPS).addFilter(_DropRecords(_REFUSAL))
    if _cpu_only_torch():
        logging.getLogger("DeepSpeed").addFilter(_DropRecords("Setting accelerator to CPU"))
