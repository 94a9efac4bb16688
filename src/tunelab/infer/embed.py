"""Sentence embeddings from an encoder: what `POST /v1/embeddings` answers."""

from __future__ import annotations


def embed(model, tokenizer, texts: list[str]) -> tuple[list[list[float]], int]:
    """Mean-pooled, L2-normalised last hidden states (what sentence-transformers computes for
    all-MiniLM-L6-v2), and the tokens read."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).tolist(), int(batch["attention_mask"].sum())
