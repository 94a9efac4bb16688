"""Decode steps written out for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) on the CPU, with
the model's own weights or with int8 weights: what `tunelab serve` runs for every decode step of such a
model in bf16, and under `--quantize int8` as llama.cpp's q8_0 runs every token.

    decoder = Decoder(model, quantize=True)            # once per loaded model: its matrices packed as int8
    logits = decoder.step(ids, positions, cache, mask) # (B, V): one new token for each of B rows

int8: each weight matrix is quantized per output channel (symmetric, 127 levels). A step of up to 4 rows
(one client, a few) multiplies its bf16 activations by the int8 weights (torch's weight-only
`_weight_int8pack_mm`: next to the unquantized answers); a wider step quantizes its activations too, per
tensor as they arrive (fbgemm's dynamic int8 linear, VNNI where the CPU has it: twice as fast at 16 rows,
further from the unquantized answers). A step reads half the weight bytes of bf16, and a small model's
step is bound by those bytes: SmolLM2-135M on machine A (2-core AMD EPYC, AVX-512), a step of 1 to 16 rows
takes 2.1-2.4x less time here than through transformers in bf16 (docs/serving.md#int8-decoding).
Unquantized (`quantize=False`), the steps multiply by the model's own weights in their own precision (its
q/k/v and gate/up matrices become views of one fused matrix each: no copy). Either way, norms, rotary
embeddings, attention and the residual stream stay in fp32 (bf16 only inside the matmuls), and the KV
cache in the model's precision. Prompts (prefill) run the model's own forward; so do rows with a
LoRA adapter.

Written by hand rather than through transformers' forward: at one row a step is a few hundred small
operations, and with the same int8 kernel transformers' decoder layers took 28.3 ms a step where these
took 18.7 (seven projections a layer where these run four: q/k/v fused, gate/up fused; no causal mask built
every step); in bf16 on machine C (Intel Xeon with AMX), a SmolLM2 step of one row took 28-30 ms here
against 37 through transformers, of 16 rows 37 against 43 (benchmarks/decode_steps.py); `torch.compile` of
these same steps took 72 s to compile for 14% less. The steps compute what transformers computes (in fp32;
tests/test_steps.py checks them against its logits for every family here, in a batch that rows join and
leave).

Answers differ slightly from transformers' forward in bf16 (its residual stream is rounded to bf16 after
every layer, here it is not) and more with int8 weights (the greedy agreement and perplexity on held-out
prompts are in docs/serving.md#int8-decoding); with int8 a row's answer may depend on the rows beside it
(how many; beyond 4, their activations' range).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model, quantize: bool = True) -> str | None:
    """Why `model` cannot decode with these steps (`quantize`: with int8 weights) here (None: it can)."""
    config = model.config
    steps, s = ("int8 decoding", "s") if quantize else ("written-out decode steps", "")  # the subject, its verbs' s
    if hasattr(model, "peft_config"):
        return (
            f"{steps} run{s} a model's own weights, not a LoRA adapter's "
            "(merge it first: tunelab export RUN DIR --format safetensors)"
        )
    if config.model_type not in FAMILIES:
        return f"{steps} cover{s} the Llama family ({', '.join(FAMILIES)}), not {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"{steps} cover{s} SiLU MLPs, not {config.hidden_act}"
    if next(model.parameters()).device.type != "cpu":
        return f"{steps} run{s} on the CPU (a GPU decodes in the model's own precision)"
    if quantize and not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines):
        return "int8 decoding needs fbgemm, torch's int8 kernels for x86 CPUs"
    return None


_LINEAR = torch.ops.quantized.linear_dynamic.default  # the overload itself: the packet's dispatch is 4 us a call


NARROW = 4  # rows up to which a step's linears are weight-only int8 (activations in bf16)


class _Linear:
    """One weight matrix (several fused: q/k/v, gate/up) with its bias. Quantized, per output channel twice:
    for torch's weight-only int8 matmul (steps of up to `NARROW` rows: near the unquantized model's answers)
    and for fbgemm's int8 linear (wider steps: int8 activations too, twice as fast at 16 rows). Unquantized,
    the modules' own weights, fused into one matrix whose rows they then are (`shared_rows`)."""

    def __init__(self, modules: list[torch.nn.Linear], quantize: bool):
        self.weight: torch.Tensor | None = None  # unquantized: the model's weights, in their own dtype
        self.bias: torch.Tensor | None = None  # fp32 with int8 weights, else the model's
        self.packed: Any = None  # fbgemm's packed int8 matrix (with its bias)
        self.int8: torch.Tensor | None = None  # (out, in) int8, for `_weight_int8pack_mm`
        self.scales: torch.Tensor | None = None  # (out,) bf16
        biases = [m.bias for m in modules]
        if not quantize:
            self.weight = shared_rows([m.weight for m in modules])
            if all(b is not None for b in biases):
                self.bias = shared_rows(biases)
            elif any(b is not None for b in biases):
                self.bias = torch.cat(
                    [m.bias.detach() if m.bias is not None else m.weight.new_zeros(len(m.weight)) for m in modules]
                )
            return
        weight = torch.cat([m.weight.detach().float() for m in modules])
        if any(b is not None for b in biases):
            self.bias = torch.cat(
                [m.bias.detach().float() if m.bias is not None else torch.zeros(len(m.weight)) for m in modules]
            )
        scales = (weight.abs().amax(1).clamp(min=1e-8) / 127).double()
        zeros = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch's quantized tensors are deprecated, fbgemm's int8 linear not yet
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, self.bias)
        self.int8, self.scales = q.int_repr().contiguous(), scales.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None and x.shape[0] <= NARROW:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.int8, self.scales).float()
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return _LINEAR(x, self.packed, _reduce_range())
        assert self.weight is not None  # kept when not quantized
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def shared_rows(parameters: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The parameters stacked into one tensor (along their first dimension), each parameter then a view of
    its rows: the fused matrix costs no memory beside the model's (7B parameters would be 14 GB more in
    bf16), and the model's forward (prompts, adapter rows) reads the same weights."""
    tensors = [p for p in parameters if p is not None]
    assert len(tensors) == len(parameters)  # all given
    if len(tensors) == 1:
        return tensors[0].detach()
    whole, start = torch.cat([p.detach() for p in tensors]), 0
    for p in tensors:
        p.data, start = whole[start : start + len(p)], start + len(p)
    return whole


@dataclass
class _Layer:
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    norms: tuple[torch.Tensor, torch.Tensor]  # before attention, before the MLP
    qk_norms: tuple[torch.Tensor, torch.Tensor] | None  # Qwen3's, per head
    window: int | None  # a sliding window's width (Mistral's; Qwen2's sliding layers)


@dataclass
class Chunk:
    """Tokens of a prompt computed inside a decode step (chunked prefill): `ids` (n,) at positions `start` to
    `start + n - 1` of one prompt whose earlier tokens' keys and values are in `cache` (the prompt's own, a
    transformers Cache), which gains these."""

    ids: torch.Tensor
    start: int
    cache: Any


class Decoder:
    """A Llama-family causal LM's decode steps with its matrices as int8, or (`quantize=False`) its own
    weights in its own precision (in fp32 tests check these steps against transformers' logits)."""

    def __init__(self, model, quantize: bool = True):
        reason = unsupported(model, quantize)
        if reason:
            raise ValueError(reason)
        config, body = model.config, model.model
        first = body.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.eps = body.norm.variance_epsilon
        self.embed, self.rotary = body.embed_tokens, body.rotary_emb
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
            self.layers.append(
                _Layer(
                    _Linear(list(projections), quantize),
                    _Linear([attn.o_proj], quantize),
                    _Linear([mlp.gate_proj, mlp.up_proj], quantize),
                    _Linear([mlp.down_proj], quantize),
                    (
                        layer.input_layernorm.weight.detach().float(),
                        layer.post_attention_layernorm.weight.detach().float(),
                    ),
                    (attn.q_norm.weight.detach().float(), attn.k_norm.weight.detach().float())
                    if hasattr(attn, "q_norm")
                    else None,
                    window,
                )
            )
        self.norm = body.norm.weight.detach().float()
        head = model.get_output_embeddings()
        self.head = _Linear([head], quantize)

    @property
    def fuses(self) -> bool:
        """Whether prompts may ride in these steps (`step`'s `chunks`): with the model's own weights. Not with
        int8 weights: a prompt's rows would set the int8 activations' range of every row beside them, and
        prompts run in the model's precision."""
        return self.head.packed is None

    @torch.inference_mode()  # 2 ms less a step than no_grad at one row: hundreds of small operations
    def step(
        self, ids: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor, chunks: Sequence[Chunk] = ()
    ) -> torch.Tensor:
        """Feed each row its token `ids` (B,) at `positions` (B,); `cache` (a transformers Cache, left-padded,
        B rows) gains their keys and values; `mask` (B, T + 1): 1 where a column of the cache, then the new
        token, is real. `chunks` (only where `fuses`): prompt tokens computed in the same pass, every matrix
        read once for the rows and the prompts (vLLM's chunked prefill); each chunk's prompt attends only to
        itself. Returns the next tokens' logits (B + len(chunks), V), the rows', then each chunk's last
        token's: in fp32 with int8 weights, else in the model's precision (as its forward's)."""
        rows, heads, kv_heads, d = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        spans, end = [], rows  # each chunk's rows among the stacked activations
        for chunk in chunks:
            spans.append((end, end + len(chunk.ids)))
            end += len(chunk.ids)
        if chunks:
            assert self.fuses  # int8 steps take rows only
            ids = torch.cat([ids, *(c.ids for c in chunks)])
            positions = torch.cat([positions, *(torch.arange(c.start, c.start + len(c.ids)) for c in chunks)])
        h = self.embed(ids).float()
        cos, sin = self.rotary(h[:, None], positions[:, None])  # (R, 1, D)
        # queries and keys rotated in one go, the queries' attention scaling folded into their rotation
        scale = torch.full((1, heads + kv_heads, 1), 1.0).index_fill_(1, torch.arange(heads), self.scaling)
        cos, sin = cos * scale, sin * scale  # (R, H + KV, D)
        biases: dict[int | None, torch.Tensor] = {}  # a window -> the additive attention mask it draws
        allowed: dict[tuple[int, int | None], torch.Tensor] = {}  # (chunk, window) -> where its tokens attend
        dtype = None
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_rms(h, layer.norms[0], self.eps)).view(end, heads + 2 * kv_heads, d)
            qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
            if layer.qk_norms is not None:
                q, k = qk.split([heads, kv_heads], 1)
                qk = torch.cat([_rms(q, layer.qk_norms[0], self.eps), _rms(k, layer.qk_norms[1], self.eps)], 1)
            q, k = _rotated(qk, cos, sin).split([heads, kv_heads], 1)
            dtype = dtype or cache.layers[i].keys.dtype
            keys, values = cache.update(k[:rows, :, None].to(dtype), v[:rows, :, None].to(dtype), i)  # (B, KV, T+1, D)
            if layer.window not in biases:
                biases[layer.window] = _attention_bias(mask, layer.window)
            # in fp32: bf16 matmuls on these small, strided (B, KV, T, D) views of the cache cost twice the casts
            scores = torch.matmul(q[:rows].reshape(rows, kv_heads, -1, d), keys.float().transpose(-1, -2))
            probs = (scores + biases[layer.window]).softmax(-1)  # (B, KV, G, T + 1)
            attended = torch.matmul(probs, values.float()).view(rows, heads * d)
            if chunks:
                prompts = []
                for c, (chunk, (lo, hi)) in enumerate(zip(chunks, spans)):
                    if (c, layer.window) not in allowed:
                        allowed[c, layer.window] = _prompt_mask(chunk.start, hi - lo, layer.window)
                    prompts.append(
                        _prompt_attention(q[lo:hi], k[lo:hi], v[lo:hi], chunk, i, allowed[c, layer.window], dtype)
                    )
                attended = torch.cat([attended, *prompts])
            h = h + layer.o(attended)
            gate, up = layer.gate_up(_rms(h, layer.norms[1], self.eps)).chunk(2, -1)
            h = h + layer.down(F.silu(gate) * up)
        if chunks:  # the rows', then each chunk's last token's
            h = h[torch.tensor([*range(rows), *(hi - 1 for _, hi in spans)])]
        return self.head(_rms(h, self.norm, self.eps))


def _prompt_mask(start: int, n: int, window: int | None) -> torch.Tensor:
    """(n, start + n): where each of a chunk's tokens (at positions `start` on) may attend in its prompt's
    cache: itself and before, within the sliding window if there is one. The same in every layer of a step."""
    queries = torch.arange(start, start + n)[:, None]
    columns = torch.arange(start + n)[None]
    allowed = columns <= queries
    if window is not None:
        allowed &= queries - columns < window
    return allowed


def _prompt_attention(q, k, v, chunk: Chunk, layer: int, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A chunk's causal attention over its prompt so far: `q` (n, H, D), `k` and `v` (n, KV, D), its keys and
    values added to the chunk's cache (in `dtype`), `allowed` its `_prompt_mask`; in fp32, as the rows' is.
    Returns (n, H * D)."""
    n, heads, d = q.shape
    keys, values = chunk.cache.update(
        k.transpose(0, 1)[None].to(dtype), v.transpose(0, 1)[None].to(dtype), layer
    )  # (1, KV, start + n, D)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.float(),
        values.float(),
        attn_mask=allowed,
        scale=1.0,  # folded into the queries' rotation
        enable_gqa=True,
    )  # (1, H, n, D)
    return out[0].transpose(0, 1).reshape(n, heads * d)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in fp32 (`F.rms_norm` took 46 us for one 576-wide row here, these four ops 15)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings on (B, heads, D), transformers' layout (the halves rotated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _attention_bias(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, 1, T) of 0 where a row's new token may attend, -inf elsewhere: its padding, and with a sliding
    window the columns `window` or more positions back (the cache keeps columns at their true distances)."""
    allowed = mask.bool()
    if window is not None:
        width = mask.shape[1]
        allowed = allowed & (torch.arange(width, device=mask.device) > width - 1 - window)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=mask.device).masked_fill_(~allowed, float("-inf"))
    return bias[:, None, None]


@functools.cache
def _reduce_range() -> bool:
    """Activations in 7 bits where the CPU has no AVX-512 VNNI (or AMX): fbgemm's other kernels add pairs of
    8-bit products in 16 bits, which saturate at full range (torch's own dynamic quantization always reduces).
    AVX-VNNI alone does not count: fbgemm's VNNI kernels are AVX-512 ones."""
    capabilities = torch.cpu.get_capabilities()
    return not (capabilities.get("avx512_vnni") or capabilities.get("amx_int8"))
