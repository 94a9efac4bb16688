"""A causal LM as one GGUF file that llama.cpp, Ollama and LM Studio run, written in Python with the
`gguf` package (no llama.cpp checkout, no compiler at export time).

    write_gguf(model, tokenizer, "model.gguf", "q8_0", chat_template, eos_id, name="my-run")

Every key and transform follows llama.cpp's own converter (`convert_hf_to_gguf.py` and its
`conversion/` modules, read for facts; this is our own code): the hyperparameters each architecture
needs, llama's Q/K row permutation (llama.cpp's rotary embedding for llama and Mistral pairs
neighbouring dimensions, HF's pairs the two halves; Qwen, Gemma and Phi-3 rotate halves in both),
Llama 3's RoPE scaling as a `rope_freqs` tensor of per-frequency divisors, Gemma's RMSNorm weights
stored as 1 + w (HF keeps w, its norm multiplies by 1 + w), Gemma-2's soft-capping and sliding window,
Phi-3's fused projections as they are, 1-D and norm tensors in F32, and tied embeddings without an
`output` tensor. What llama.cpp would compute differently (a sliding window its llama, Qwen and Phi-3
graphs do not draw, an attention scale it does not read) is refused, or bounded, before any weight loads:
`architecture(config)`. Quantized types
are the `gguf` package's numpy quantizers (its Q8_0 is bit-exact with ggml's). The tokenizer goes in as
llama.cpp reads it: a byte-level BPE from tokenizer.json, or a SentencePiece vocabulary copied from
the GGUF the model was imported from (its scores cannot be recovered from tokenizer.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunelab.data.render import adds_bos
from tunelab.errors import UserError

# HF model_type -> GGUF architecture (llama.cpp runs Mistral checkpoints as llama)
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
WRITTEN = ("f32", "f16", "bf16", "q8_0", "q4_0")  # written here, by the `gguf` package's quantizers
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # quantized by llama.cpp itself from the f16 file (`quantize`)
TYPES = WRITTEN + K_QUANTS


def write_gguf(
    model,
    tokenizer,
    out: Path,
    kind: str,
    chat_template: str | None,
    eos_id: int,
    name: str,
    tokenizer_gguf: Path | None = None,
) -> None:
    """Write `model` (a plain causal LM, float weights) and `tokenizer` to the GGUF file `out`.

    `kind` is one of TYPES; `chat_template` goes in as `tokenizer.chat_template`; `eos_id` is the token
    generation stops at (the end-of-turn token the model learned to stop on); `tokenizer_gguf`, the GGUF
    whose `tokenizer.*` keys to copy (a SentencePiece vocabulary)."""
    import gguf

    config = model.config
    arch = architecture(config)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type("model")
    writer.add_name(name)
    _hyperparameters(writer, config, arch)
    writer.add_file_type(int(_file_type(kind)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rows = model.get_input_embeddings().weight.shape[0]
    tokens = _tokenizer(writer, tokenizer, tokenizer_gguf, rows)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_eos_token_id(eos_id)
    if tokenizer.convert_ids_to_tokens(eos_id) != tokenizer.eos_token:
        writer.add_eot_token_id(eos_id)  # an end-of-turn token: llama.cpp stops there as at EOS
    _tensors(writer, model, arch, kind, tokens)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_lora(model, out: Path, name: str) -> None:
    """A LoRA run's adapter (a peft model) as a GGUF adapter, which llama.cpp's `--lora` and Ollama's
    `ADAPTER` apply on top of the base model's GGUF without merging: each adapted matrix's A and B as
    `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r) in F32, llama's Q/K rows reordered in B as the
    base's are, and alpha as `adapter.lora.alpha` (llama.cpp scales by alpha / r, as peft does), the keys
    llama.cpp's `convert_lora_to_gguf.py` writes."""
    import gguf
    import torch

    base = model.get_base_model()
    config, adapter = base.config, model.peft_config[model.active_adapter]
    arch = architecture(config)
    if adapter.use_dora or adapter.use_rslora:
        kind = "DoRA" if adapter.use_dora else "rsLoRA"
        raise UserError(f"--format gguf-lora: llama.cpp applies plain LoRA, not {kind}; export the merged model")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.lora_alpha))
    writer.add_name(name)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    prefix = "base_model.model."
    count = 0
    for module_name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or model.active_adapter not in lora_a:
            continue
        hf_name = module_name.removeprefix(prefix) + ".weight"
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None:
            raise UserError(f"--format gguf-lora: no GGUF name for the adapted matrix {hf_name!r}")
        a = lora_a[model.active_adapter].weight.detach().to(torch.float32).numpy()
        b = module.lora_B[model.active_adapter].weight.detach().to(torch.float32).numpy()
        b = _llama_rotary_rows(b, hf_name, config, arch)  # B's rows are the projection's outputs
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(b))
        count += 1
    if count == 0:
        raise UserError("--format gguf-lora: the adapter adapts no matrix llama.cpp knows")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, out: Path, kind: str) -> None:
    """An f16 GGUF `source` quantized to the K-quant `kind` in `out` by llama.cpp's own quantizer
    (`llama_model_quantize`, through llama-cpp-python): its mixtures (q4_k_m keeps some tensors in q6_k) and
    its block formats are llama.cpp's, which no Python writer reproduces."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--type {kind}: quantized by llama.cpp, through llama-cpp-python (`pip install llama-cpp-python`, "
            "or `make install`); q8_0 and q4_0 need nothing more"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = 0  # llama.cpp's default: every core
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"--type {kind}: llama.cpp's quantizer failed on {source.name} (code {code})")


def _file_type(kind: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[
        kind
    ]


def architecture(config) -> str:
    """The GGUF architecture of an HF `config`, after checking that llama.cpp computes this model as
    transformers does (else a UserError naming what differs)."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(
            f"GGUF export supports the model types {', '.join(ARCHITECTURES)} (Llama, Mistral, Qwen2/2.5, "
            f"Qwen3, Gemma-2, Gemma-3, Phi-3 and their fine-tunes); this model is {config.model_type!r}. "
            "`--format safetensors` exports any model"
        )
    _rope(config, arch)
    head_dim = _head_dim(config)
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales attention by 1/sqrt(head_dim), by 1/sqrt(n_embd / n_head) for the largest Gemma
        # (Gemma-2 27B: 46 layers; Gemma-3 27B: 62); it has no key for query_pre_attn_scalar
        largest = {"gemma2": 46, "gemma3": 62}[arch]
        scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == largest else head_dim
        if getattr(config, "query_pre_attn_scalar", scale) != scale:
            raise UserError(
                f"GGUF export: this Gemma scales attention by 1/sqrt({config.query_pre_attn_scalar}), "
                f"llama.cpp by 1/sqrt({scale}): it would compute another model"
            )
        period = 2 if arch == "gemma2" else 6  # llama.cpp: Gemma-2 alternates local/global, Gemma-3 5 local then 1
        pattern = [t == "sliding_attention" for t in config.layer_types]
        if pattern != [(i + 1) % period != 0 for i in range(len(pattern))]:
            raise UserError(
                f"GGUF export: this Gemma's sliding/full layer pattern is not llama.cpp's (every {period}th layer "
                f"full, the others sliding): {config.layer_types}"
            )
    if arch == "gemma3" and (
        getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    ):
        raise UserError("GGUF export: llama.cpp's Gemma-3 has no logit soft-capping, and this model uses it")
    if arch == "gemma2" and not getattr(config, "tie_word_embeddings", True):
        raise UserError("GGUF export: llama.cpp's Gemma-2 reads its output matrix from the embedding (tied)")
    if arch == "phi3" and config.num_attention_heads * head_dim != config.hidden_size:
        raise UserError("GGUF export: llama.cpp's Phi-3 needs heads x head_dim = hidden_size")
    return arch


def unwindowed_context(config, arch: str) -> int:
    """The context length to write: the model's, or, where llama.cpp's graph for `arch` draws no sliding
    window (llama, so Mistral; Qwen2; Phi-3) and the model has one, the window: up to it, sliding and full
    attention are the same, so the file computes the source model over every context it claims."""
    context = config.max_position_embeddings
    if arch in ("gemma2", "gemma3"):
        return context
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None  # Qwen2 without use_sliding_window
    return min(context, window) if window else context


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, arch: str) -> dict:
    """The RoPE parameters per attention kind, {"full": {...}, "sliding": {...} or None}, after checking
    that llama.cpp reproduces their scaling: Llama 3's (`llama3`) and linear on llama, none elsewhere."""
    params = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    full, sliding = (
        (params["full_attention"], params.get("sliding_attention")) if "full_attention" in params else (params, None)
    )
    allowed = ("default", "llama3", "linear") if arch == "llama" else ("default",)
    for p in (full, sliding):
        kind = (p or {}).get("rope_type", "default")
        if kind not in allowed:
            raise UserError(
                f"GGUF export: RoPE scaling {kind!r} on a {config.model_type} model is not one llama.cpp "
                f"reproduces from this export (supported: {', '.join(allowed)})"
            )
    return {"full": full, "sliding": sliding}


def _hyperparameters(writer, config, arch: str) -> None:
    rope, head_dim = _rope(config, arch), _head_dim(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(unwindowed_context(config, arch))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["full"]["rope_theta"]))  # llama.cpp's default (10000) is not every model's
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)  # llama.cpp requires all of a head to rotate
        if rope["full"].get("rope_type") == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["full"]["factor"]))
    if arch == "phi3":
        rotary = rope["full"].get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // config.num_attention_heads)
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(0)  # llama.cpp's Phi-3 draws no window (the context is bounded instead)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        if rope["sliding"] is not None:
            writer.add_rope_freq_base_swa(float(rope["sliding"]["rope_theta"]))
        writer.add_sliding_window(config.sliding_window)


def _llama3_rope_factors(config) -> np.ndarray:
    """Llama 3's RoPE scaling as llama.cpp takes it: per rotary frequency the number its angle is divided
    by (1 for short wavelengths, `factor` for long ones, a smooth blend between), the `rope_freqs` tensor
    llama.cpp's converter computes from the same four parameters."""
    import math

    rope = _rope(config, "llama")["full"]
    dim = _head_dim(config)
    base, factor = float(rope["rope_theta"]), float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- the tokenizer ------------------------------------------------------------------------------------


def _tokenizer(writer, tokenizer, tokenizer_gguf: Path | None, rows: int) -> int:
    """Write the tokenizer keys; returns the number of tokens (the embedding's rows must match it). A
    byte-level BPE's list is padded with unused `[PADn]` tokens to the embedding's `rows` (Qwen's and
    Phi-3's embeddings have spare rows), as llama.cpp's converter pads it."""
    if tokenizer_gguf is not None:
        return _copy_tokenizer(writer, tokenizer, tokenizer_gguf)
    found = byte_level_bpe(tokenizer)
    if found is None:
        raise UserError(
            "GGUF export: the tokenizer is neither a byte-level BPE with GPT-2's split (as SmolLM2's) "
            "nor a SentencePiece vocabulary from the GGUF the model was imported from"
        )
    spec, pre = found
    model = spec["model"]
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    size = max(len(tokenizer), max(vocab.values()) + 1, rows)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    added = {t["id"]: t for t in spec["added_tokens"]}
    from gguf import TokenType

    types = [int(TokenType.NORMAL)] * size
    for i in range(size):
        if tokens[i] == f"[PAD{i}]":
            types[i] = int(TokenType.UNUSED)
        elif i in added:
            types[i] = int(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (("bos", tokenizer.bos_token), ("unk", tokenizer.unk_token), ("pad", tokenizer.pad_token)):
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(adds_bos(tokenizer))
    return size


def byte_level_bpe(tokenizer) -> tuple[dict, str] | None:
    """(tokenizer.json as a dict, llama.cpp's pre-tokenizer name) of a byte-level BPE tokenizer llama.cpp
    reproduces from its tokens and merges, else None (a SentencePiece vocabulary, say)."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    if normalizer is not None and type(normalizer).__name__ != "NFC":  # spares serialising Gemma's 33 MB
        return None
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = _pre_tokenizer(spec)
    return (spec, pre) if spec["model"]["type"] == "BPE" and pre is not None else None


# The regular expressions byte-level BPE tokenizers split text with before their merges, by llama.cpp's
# name for the same split: Qwen2's (also Qwen2.5's and Qwen3's: each digit alone) and Llama 3's (digits in
# threes); tokenizer.json spells them as here.
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for how the tokenizer splits text before BPE, from tokenizer.json: GPT-2's regex
    under byte-level is "gpt-2"; every digit split off first, then GPT-2's regex, is "smollm"; one of
    SPLITS, then byte-level without its own regex, is that split's name (Qwen's under Unicode NFC, as
    llama.cpp's converter names Qwen tokenizers). None: a split llama.cpp would not reproduce."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in parts]
    normalizer = (spec.get("normalizer") or {}).get("type")
    if len(parts) == 2 and kinds[0][0] == "Split" and kinds[1] == ("ByteLevel", None, False):
        name = SPLITS.get((parts[0].get("pattern") or {}).get("Regex", ""))
        if parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
            return name if normalizer is None or (normalizer == "NFC" and name == "qwen2") else None
        return None
    if normalizer or not kinds or kinds[-1] != ("ByteLevel", None, True):
        return None
    if len(kinds) == 1:
        return "gpt-2"
    return "smollm" if kinds[:-1] == [("Digits", True, True)] else None


def _copy_tokenizer(writer, tokenizer, source: Path) -> int:
    """The `tokenizer.*` keys of `source` (a GGUF), but for the chat template and EOS, which we write."""
    from tunelab.models.gguf import read_metadata

    count = 0
    for key, (kind, sub_type, value) in read_metadata(source, "tokenizer.").items():
        if key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            continue
        writer.add_key_value(key, value, kind, sub_type=sub_type)
        if key == "tokenizer.ggml.tokens":
            count = len(value)
    if count != len(tokenizer):
        raise UserError(
            f"GGUF export: {source} has a vocabulary of {count:,} tokens, the model's tokenizer "
            f"{len(tokenizer):,}: not the same tokenizer"
        )
    return count


# --- the tensors --------------------------------------------------------------------------------------


def _tensors(writer, model, arch: str, kind: str, tokens: int) -> None:
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if arch == "llama" and _rope(config, arch)["full"].get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config), raw_dtype=gguf.GGMLQuantizationType.F32)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for the tensor {hf_name!r} of this {arch} model")
        data = tensor.detach().to(torch.float32).numpy()
        data = _llama_rotary_rows(data, hf_name, config, arch)
        if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if name == "token_embd.weight" and data.shape[0] != tokens:
            raise UserError(
                f"GGUF export: the embedding has {data.shape[0]:,} rows and the vocabulary {tokens:,} "
                "tokens; llama.cpp needs one row per token"
            )
        qtype = _tensor_type(name, data, kind, tied)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a whole number of blocks: F16, as llama.cpp's converter falls back
            qtype, packed = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        writer.add_tensor(name, np.ascontiguousarray(packed), raw_dtype=qtype)


def _llama_rotary_rows(data: np.ndarray, hf_name: str, config, arch: str) -> np.ndarray:
    """`data` (the rows of the HF tensor `hf_name`, or of a LoRA B on it) in llama.cpp's rotary layout where
    llama.cpp's llama graph needs it (a query or key projection's weight or bias), else as it is."""
    if arch != "llama" or not hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
        return data
    return _rotary_rows(data, config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads)


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows reordered from HF's rotary layout (each head's first half pairs with its second half)
    to llama.cpp's (neighbouring rows pair)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, data: np.ndarray, kind: str, tied: bool):
    """The GGML type of one tensor: F32 for 1-D and norm tensors; in a q4_0 file the output matrix (the
    embedding, when tied) in Q8_0, as llama.cpp's own quantizer keeps it (Q6_K there, whose 256-wide
    blocks these rows do not fill, so Q8_0)."""
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if kind == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return Q.Q8_0
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
