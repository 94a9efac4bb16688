"""Tiny random models saved as plain HF directories, with the tiny tokenizers: built in a second."""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizer import base_tokenizer, chat_tokenizer


def tiny_llama_dir(
    folder: Path,
    chat: bool = True,
    seed: int = 0,
    positions: int = 256,
    template: str | None = None,
    vocab: int | None = None,
) -> Path:
    """A 2-layer Llama (hidden 32) with a ChatML tokenizer (chat; or `template`) or a base one that adds BOS;
    `vocab`: an output layer that wide (the tokenizer's ids first), for a real LM's long softmax tail."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer() if chat else base_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
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


ENCODER_FAMILIES = ("bert", "roberta", "deberta-v2", "modernbert")
SEQ2SEQ_FAMILIES = ("t5", "bart")


def tiny_bert_dir(folder: Path, seed: int = 0, family: str = "bert") -> Path:
    """A 2-layer encoder of `family` (ENCODER_FAMILIES: BERT; RoBERTa; DeBERTa-v2's disentangled
    attention; ModernBERT's alternating local/global attention and fused projections), hidden 32, without
    a task head as pretrained ones come, with a WordPiece tokenizer over a few dozen words: [CLS] text [SEP]."""
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
    import transformers as tf

    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "bert":
        model = BertModel(BertConfig(**common))
    elif family == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(**common))
    elif family == "deberta-v2":
        model = tf.DebertaV2Model(tf.DebertaV2Config(**common))
    elif family == "modernbert":
        model = tf.ModernBertModel(tf.ModernBertConfig(global_attn_every_n_layers=2, local_attention=8, **common))
    else:
        raise ValueError(f"no tiny {family!r}; one of {ENCODER_FAMILIES}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5_dir(folder: Path, seed: int = 0, family: str = "t5") -> Path:
    """A 2+2-layer encoder-decoder of `family` (SEQ2SEQ_FAMILIES: T5, d_model 32; BART, the same size)
    with the tiny base tokenizer (it adds no EOS: tunelab appends it)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tokenizer = base_tokenizer()
    torch.manual_seed(seed)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "t5":
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
        model = T5ForConditionalGeneration(config)
    elif family == "bart":
        config = BartConfig(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,  # BART starts its decoder at EOS
            forced_eos_token_id=None,
            **ids,
        )
        model = BartForConditionalGeneration(config)
    else:
        raise ValueError(f"no tiny {family!r}; one of {SEQ2SEQ_FAMILIES}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The decoder families tunelab trains, serves and exports, each as a tiny random model with what sets it
# apart from Llama switched on: Llama 3.x's `llama3` RoPE scaling (an original context of 32 positions,
# so that the scaled frequencies are the ones a 16-dimension head uses), Qwen2's attention biases,
# Qwen3's query and key norms, Mistral's (and Gemma-2's, Gemma-3's) sliding windows shorter than the
# texts, Gemma-2's alternating local/global layers and logit soft-capping (caps small enough to bite on
# a random model), Phi-3's fused qkv and gate_up projections; tied and separate output matrices. Heads of 16 dimensions: llama.cpp's
# rotary kernels want an even number, and Gemma's attention scale is 1/sqrt(head_dim) as llama.cpp's.
DECODER_FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def tiny_decoder(family: str, vocab_size: int, seed: int = 0, window: int | None = 4, **special):
    """A random 4-layer (Gemma-3: 6) causal LM of `family` (DECODER_FAMILIES), hidden 32, 2 query heads and 1 key/value
    head of 16. `window`: the sliding window of the families that have one (None: none); `special`, the
    tokenizer's bos/eos/pad ids for the config."""
    import torch
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=family
        in ("llama", "gemma2", "gemma3"),  # SmolLM2 and Gemma tie; Qwen2.5-7B, Mistral, Phi-3 not
        **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **special},
    )
    theta = 10000.0
    if family in ("llama", "llama3"):
        rope = {"rope_type": "default", "rope_theta": theta}
        if family == "llama3":
            rope = {
                "rope_type": "llama3",
                "rope_theta": theta,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        config = tf.LlamaConfig(rope_parameters=rope, **common)
        model = tf.LlamaForCausalLM
    elif family == "qwen2":
        config, model = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config, model = tf.Qwen3Config(**common), tf.Qwen3ForCausalLM
    elif family == "mistral":
        config, model = tf.MistralConfig(sliding_window=window, **common), tf.MistralForCausalLM
    elif family == "gemma2":
        config = tf.Gemma2Config(
            sliding_window=window or 4096,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            **common,
        )
        model = tf.Gemma2ForCausalLM
    elif family == "gemma3":
        common["num_hidden_layers"] = 6  # llama.cpp's Gemma-3: 5 local layers, then 1 global
        config = tf.Gemma3TextConfig(sliding_window=window or 4096, query_pre_attn_scalar=16, **common)
        model = tf.Gemma3ForCausalLM
    elif family == "phi3":
        config, model = tf.Phi3Config(sliding_window=window, **common), tf.Phi3ForCausalLM
    else:
        raise ValueError(f"no tiny {family!r}; one of {DECODER_FAMILIES}")
    torch.manual_seed(seed)
    lm = model(config)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):  # not all ones (or zeros): a norm's weight must show where it goes
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.5 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(10)  # a random model's attention is otherwise near uniform: a wrong rotary layout would not show
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return lm.eval()


def tiny_decoder_dir(folder: Path, family: str, seed: int = 0, window: int | None = 4) -> Path:
    """`tiny_decoder(family)` with the tiny ChatML tokenizer, saved as a plain HF directory. The embedding has
    a few rows more than the tokenizer has tokens, as Qwen's and Phi-3's do (rounded up to a multiple of 16);
    the tokens counted as transformers loads the tokenizer for that family (its Qwen2 tokenizer adds
    `<|endoftext|>`)."""
    from transformers import AutoTokenizer

    tokenizer = chat_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    tokenizer.save_pretrained(folder)
    tiny_decoder(family, len(tokenizer), seed, window, **ids).config.save_pretrained(folder)
    tokens = len(AutoTokenizer.from_pretrained(folder))
    tiny_decoder(family, -(-tokens // 16) * 16, seed, window, **ids).save_pretrained(folder)
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
