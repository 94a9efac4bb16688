"""Import a GGUF file once into a plain safetensors Hugging Face checkpoint.

transformers can read a GGUF (`from_pretrained(dir, gguf_file=name)`), but it de-quantizes on every
load (15-100 s for our small models), and a model loaded that way carries a quantizer that HF training
code refuses. So we de-quantize once, save a float32 checkpoint with the tokenizer and chat template,
and from then on everything loads it like any HF directory, in well under a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.fs import atomic_dir

MARKER = "tunelab.json"  # written last: a checkpoint without it is not a finished import

# Text whose ids must be the same from the GGUF's tokenizer and from the saved one: ASCII, digits,
# runs of spaces, accents, CJK and an emoji, so a converter that loses bytes or merges shows up.
_PROBE = "Hello world!  The year 2024 — café, naïve, 東京, 🙂.\n\tindented"


def import_gguf(gguf_path: Path, dest: Path, provenance: dict | None = None) -> Path:
    """De-quantize `gguf_path` into an HF checkpoint at `dest` (atomic), and return `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_header(gguf_path)
    _check_transformers_reads(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,  # de-quantized values are not exactly representable in bf16
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as e:  # anything here is about the file (or transformers' support for it)
        raise UserError(f"{gguf_path}: transformers cannot read this GGUF ({_first_line(e)})") from None
    _drop_quantization(model)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_loads_back(tmp, model, tokenizer)
        info = {
            "source": str(gguf_path),
            "architecture": model.config.model_type,
            "parameters": model.num_parameters(),
            "import_seconds": round(time.perf_counter() - start, 1),
            **(provenance or {}),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return dest


def _check_header(path: Path) -> None:
    # magic, version (u32), tensor count (u64), metadata count (u64): 24 bytes every GGUF starts with
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it does not start with a GGUF header)")


def _check_transformers_reads(path: Path) -> None:
    """A UserError, before anything is read, for a GGUF that transformers' reader (5.x) would turn into
    another model than the one llama.cpp runs from it: what it does not read back it fills with its
    config defaults, silently."""
    try:
        meta, tensors = read_header(path)
    except Exception:  # a header this reader cannot walk: transformers' own reader says what is wrong
        return

    def number(key: str, default=None):
        found = meta.get(f"{arch}.{key}")
        return found[2] if found is not None else default

    arch = meta.get("general.architecture", (None, None, b""))[2].decode()
    problem = None
    if arch == "llama" and "rope_freqs.weight" in tensors:
        problem = "it drops Llama 3's RoPE scaling (the file's rope_freqs)"
    elif arch == "llama" and meta.get("llama.rope.scaling.type", (None, None, b"none"))[2] not in (b"none",):
        problem = "it drops the file's RoPE scaling (llama.rope.scaling.type)"
    elif arch == "qwen3" and number("attention.key_length", 128) != 128:
        problem = f"it reads a Qwen3 head size of 128 whatever the file says ({number('attention.key_length')})"
    elif arch == "gemma2" and number("attention.key_length", 256) != 256:
        problem = "it scales Gemma-2's attention by 1/sqrt(256), llama.cpp by 1/sqrt(the head size, "
        problem += f"{number('attention.key_length')})"
    elif arch == "gemma2" and (number("attn_logit_softcapping", 50.0), number("final_logit_softcapping", 30.0)) != (
        50.0,
        30.0,
    ):
        problem = "it takes Gemma-2's soft-caps as 50 and 30, not the file's"
    elif arch == "phi3":
        heads, width = number("attention.head_count"), number("embedding_length")
        if heads and width and number("rope.dimension_count", width // heads) != width // heads:
            problem = "it rotates all of each Phi-3 head, the file only part of it"
    if problem is not None:
        raise UserError(
            f"{path}: transformers' GGUF reader cannot import this {arch} model: {problem}; "
            "import its safetensors checkpoint instead (a model directory), or run the GGUF in llama.cpp"
        )


def _drop_quantization(model) -> None:
    """Make the de-quantized model an ordinary one: no quantizer, no `quantization_config` saved."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_loads_back(folder: Path, model, tokenizer) -> None:
    """Plain transformers must load what we wrote and get the same ids and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError("the imported config.json still holds a quantization_config")
    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(_PROBE).input_ids
    if reloaded_tok(_PROBE).input_ids != ids:
        raise RuntimeError("the saved tokenizer does not give the GGUF tokenizer's ids")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    x = torch.tensor([ids[:16]])
    with torch.no_grad():
        if not torch.allclose(model(x).logits, reloaded(x).logits, rtol=0, atol=1e-5):
            raise RuntimeError("the saved checkpoint does not give the de-quantized model's logits")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- reading a GGUF's header ---------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path, prefix: str = "") -> dict:
    """{key: (value type, array element type or None, value)} of a GGUF's metadata keys starting with
    `prefix`: strings as bytes, arrays as lists, as GGUFWriter.add_key_value takes them back.

    Written by hand because gguf's GGUFReader builds a numpy view per array element: Gemma-3's 262,144
    tokens took it 20 s (its scores and types as many again), this loop well under a second.
    """
    return read_header(path, prefix)[0]


def read_header(path: Path, prefix: str = "") -> tuple[dict, list[str]]:
    """(`read_metadata(path, prefix)`, the names of the file's tensors), from its header alone."""
    import mmap
    import struct

    import numpy as np
    from gguf import GGUFValueType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _, kv_count = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version < 2:
            raise UserError(f"{path}: not a GGUF file of version 2 or later")
        at = 24

        def string() -> bytes:
            nonlocal at
            (n,) = struct.unpack_from("<Q", buf, at)
            at += 8 + n
            return buf[at - n : at]

        def value(kind: int):  # (value, array element type or None)
            nonlocal at
            if kind == _STRING:
                return string(), None
            if kind == _ARRAY:
                sub_type, n = struct.unpack_from("<IQ", buf, at)
                at += 12
                if sub_type in _SCALARS:  # numbers: one read for the whole array
                    dtype = np.dtype(_SCALARS[sub_type])
                    at += n * dtype.itemsize
                    return np.frombuffer(buf, dtype, n, at - n * dtype.itemsize).tolist(), sub_type
                return [value(sub_type)[0] for _ in range(n)], sub_type
            if kind not in _SCALARS:
                raise UserError(f"{path}: metadata value type {kind} at byte {at} is not one GGUF defines")
            at += struct.calcsize(_SCALARS[kind])
            return struct.unpack_from(_SCALARS[kind], buf, at - struct.calcsize(_SCALARS[kind]))[0], None

        found = {}
        for _ in range(kv_count):
            key = string().decode("utf-8")
            (kind,) = struct.unpack_from("<I", buf, at)
            at += 4
            data, sub_type = value(kind)
            if key.startswith(prefix):
                found[key] = (GGUFValueType(kind), None if sub_type is None else GGUFValueType(sub_type), data)
        names = []
        (tensor_count,) = struct.unpack_from("<Q", buf, 8)
        for _ in range(tensor_count):  # name, dimension count (u32), dimensions (u64 each), type (u32), offset (u64)
            names.append(string().decode("utf-8"))
            (dims,) = struct.unpack_from("<I", buf, at)
            at += 4 + 8 * dims + 4 + 8
        return found, names
