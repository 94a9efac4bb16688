"""Inference: prompts as the model trained on them (`prompts`), generation one reply at a time or in
batches (`generate`), and the interactive chat (`chat`). Models load through `models.load`."""
