"""Tiny random models saved as plain HF directories, with the tiny tokenizers: built in a second."""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizer import base_tokenizer, chat_tokenizer


def tiny_llama_dir(folder: Path, chat: bool = True, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) with a ChatML tokenizer (chat) or a base one that adds BOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer() if chat else base_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
