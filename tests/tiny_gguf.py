"""Write a tiny Llama GGUF the way llama.cpp's converter does, from a random HF model.

The test of our import needs a GGUF with known weights: we build a 2-layer Llama from a config,
write its tensors under llama.cpp's names and conventions (Q/K rows permuted for its RoPE layout,
Q8_0 quantized matrices, F32 norms, the tokenizer as metadata), and keep the weights a reader must
recover (the de-quantized values) to compare with what the import produces.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def tiny_tokenizer_vocab() -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, and the chat specials."""
    tokens = SPECIALS + list(bytes_to_unicode().values())
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    return tokens, [int(t) for t in types]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Q and K with each head's rotary halves interleaved; HF keeps them split.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the GGUF; return the HF state dict a correct reader must produce from it."""
    tokens, types = tiny_tokenizer_vocab()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a reader that loses norms shows up

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embedding: llama.cpp writes no output tensor
        data = tensor.numpy().astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if data.ndim == 2:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            restored = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
            if hf_name.endswith("q_proj.weight"):
                restored = _unpermute(restored, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                restored = _unpermute(restored, config.num_key_value_heads)
        else:
            writer.add_tensor(gguf_name, data)
            restored = data
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(restored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
