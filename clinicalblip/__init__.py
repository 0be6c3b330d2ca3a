"""clinicalblip: radiology report generation with InstructBLIP, multi-stage LoRA, prompts with clinical context."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft whenever it is installed) warns at import on every CPU with AVX512-BF16 that
# it cannot fetch an optional kernel from the Hugging Face hub; it then uses its own CPU kernel. The warning
# is noise on every command, so this one logger is quietened (nothing else is).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
