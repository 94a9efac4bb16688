"""Tiny random models saved as plain HF directories, with the tiny tokenizers: built in a second."""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizer import base_tokenizer, chat_tokenizer


def tiny_llama_dir(
    folder: Path, chat: bool = True, seed: int = 0, positions: int = 256, template: str | None = None
) -> Path:
    """A 2-layer Llama (hidden 32) with a ChatML tokenizer (chat; or `template`) or a base one that adds BOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer() if chat else base_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


WORDS = [
    "good",
    "great",
    "fine",
    "lovely",
    "superb",
    "nice",
    "bad",
    "awful",
    "poor",
    "terrible",
    "dull",
    "ugly",
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "was",
    "is",
    "very",
    "and",
    "but",
    "it",
    "this",
    "acting",
    "story",
    "ending",
    "world",
    "sports",
    "business",
    "science",
    "team",
    "game",
    "market",
    "price",
]


def tiny_bert_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer over a few dozen words: [CLS] text [SEP]."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    raw = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)  # an encoder without a task head, as pretrained ones come
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5_dir(folder: Path, seed: int = 0) -> Path:
    """A 2+2-layer T5 (d_model 32) with the tiny base tokenizer (it adds no EOS: tunelab appends it)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = base_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gemma3(vocab_size: int = 64):
    """A random 4-layer Gemma-3 whose sliding window (4) is shorter than the texts the tests give it:
    three sliding-window layers and one global."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(config).eval()
