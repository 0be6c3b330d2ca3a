"""clinicalblip: radiology report generation with InstructBLIP, multi-stage LoRA, prompts with clinical context."""

__version__ = "0.1.0"
