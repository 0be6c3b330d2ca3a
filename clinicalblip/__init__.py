"""clinicalblip: radiology report generation with InstructBLIP, multi-stage LoRA, prompts with clinical context."""

__version__ = "0.1.0"

from clinicalblip import _imports

# No network at import and no third-party notices the user cannot act on: see clinicalblip/_imports.py.
_imports.install()
