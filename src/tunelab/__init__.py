"""tunelab: adapt pretrained language models (task fine-tuning, instruction-tuning, preference alignment)."""

__version__ = "0.1.0"
