"""tunelab: adapt pretrained language models (task fine-tuning, instruction-tuning, preference alignment)."""

import os

__version__ = "0.1.0"

# transformers (5.x, with its `kernels` dependency) swaps some layers on a GPU for compiled kernels it downloads
# from the Hugging Face Hub at the first forward pass: code from the network, and on a machine without one a
# crash ("... is not available in the local cache and Hugging Face Hub is in offline mode"). tunelab runs no
# code from the network unless asked: USE_HUB_KERNELS=YES in the environment turns them back on.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
