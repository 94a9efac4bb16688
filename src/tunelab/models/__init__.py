"""Models: the registry of real pretrained weights, GGUF import, and resolving any model name to a directory."""

from tunelab.models.registry import REGISTRY, ModelSpec, status, tunelab_home
from tunelab.models.resolve import import_gguf_file, pull, resolve_model

__all__ = ["REGISTRY", "ModelSpec", "import_gguf_file", "pull", "resolve_model", "status", "tunelab_home"]
