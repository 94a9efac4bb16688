"""`tunelab export`: a run or a model as a GGUF file (llama.cpp, Ollama, LM Studio) or as a merged
safetensors checkpoint (plain transformers), written under a temporary name and renamed when complete.

    export("runs/quickstart-gemma3", Path("gemma3-alpaca.gguf"))  # q8_0, and gemma3-alpaca.Modelfile for Ollama
    export("runs/sft-smollm2-alpaca", Path("merged/"), fmt="safetensors")

A LoRA run is merged into its base first (W + B A alpha / r, one plain weight); a full or freeze run
exports as it is. The GGUF carries the chat template the run was trained with and, as EOS, the token
the model learned to end its turn with, so llama.cpp and Ollama stop where `tunelab generate` stops.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import UserError

FORMATS = ("gguf", "gguf-lora", "safetensors", "vllm")


def export(target: str, out: Path, fmt: str = "gguf", kind: str = "q8_0", force: bool = False) -> Path:
    """Export `target` (a run, registry name, model directory or .gguf) to `out`; returns `out`."""
    from tunelab.export.gguf import TYPES
    from tunelab.fs import atomic_dir, atomic_file
    from tunelab.models import resolve_model
    from tunelab.models.load import base_folder, load_causal_lm

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "gguf" and kind not in TYPES:
        raise UserError(f"--type {kind}: expected one of {', '.join(TYPES)}")
    for path in [out] + ([modelfile_path(out)] if fmt == "gguf" else []):
        if path.exists() and not force:
            raise UserError(f"{path}: already exists; pass --force to replace it")
    folder = resolve_model(target)
    if fmt == "gguf-lora":
        return _export_adapter(folder, out, _name(target))
    if fmt == "vllm":
        from tunelab.export.vllm import export_vllm

        return export_vllm(folder, out, _name(target))
    if fmt == "gguf":  # refused before any weights load, naming what is supported
        from transformers import AutoConfig

        from tunelab.export.gguf import architecture

        architecture(AutoConfig.from_pretrained(base_folder(folder)))
    model, tokenizer = load_causal_lm(folder)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # W + B A * alpha / r, as one plain weight
    if fmt == "safetensors":
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return out
    from tunelab.export.gguf import K_QUANTS, quantize, write_gguf

    template = tokenizer.chat_template
    eos_id = end_of_turn_id(tokenizer, template)
    with vocabulary_gguf(base_folder(folder), tokenizer) as vocabulary, atomic_file(out) as tmp:
        if kind in K_QUANTS:  # llama.cpp quantizes the f16 file, written beside it first
            f16 = tmp.with_name(tmp.name + ".f16")
            try:
                write_gguf(model, tokenizer, f16, "f16", template, eos_id, _name(target), vocabulary)
                quantize(f16, tmp, kind)
            finally:
                f16.unlink(missing_ok=True)
        else:
            write_gguf(model, tokenizer, tmp, kind, template, eos_id, _name(target), vocabulary)
    from tunelab.export.ollama import modelfile
    from tunelab.fs import atomic_write_text

    atomic_write_text(modelfile_path(out), modelfile(out.name, tokenizer, tokenizer.convert_ids_to_tokens(eos_id)))
    return out


def _export_adapter(folder: Path, out: Path, name: str) -> Path:
    """A LoRA run's adapter alone, as a GGUF adapter for llama.cpp and Ollama (the base exported apart)."""
    from tunelab.export.gguf import write_gguf_lora
    from tunelab.fs import atomic_file
    from tunelab.models.load import load_causal_lm

    if not (folder / "adapter_config.json").exists():
        raise UserError(
            f"--format gguf-lora: {folder} is not a LoRA adapter (a run with tuning.mode lora); "
            "export the model itself with --format gguf"
        )
    model, _ = load_causal_lm(folder)
    with atomic_file(out) as tmp:
        write_gguf_lora(model, tmp, name)
    return out


def modelfile_path(out: Path) -> Path:
    """The Ollama Modelfile written beside a GGUF: `model.gguf` -> `model.Modelfile`."""
    return out.with_suffix(".Modelfile")


def end_of_turn_id(tokenizer, template: str | None) -> int:
    """The token generation stops at: the one the template ends an assistant turn with (what training
    taught the model to write last), else the tokenizer's EOS."""
    if template:
        from tunelab.data.render import Renderer

        token = Renderer(tokenizer, "chat").end_of_turn()  # the tokenizer carries `template`
        if token is not None:
            return tokenizer.convert_tokens_to_ids(token)
    if tokenizer.eos_token_id is None:
        raise UserError(
            "GGUF export: the tokenizer has no EOS token and no chat template ends a turn: a runtime "
            "would not know where to stop"
        )
    return tokenizer.eos_token_id


@contextmanager
def vocabulary_gguf(folder: Path, tokenizer):
    """The GGUF whose SentencePiece vocabulary the export copies, or None for a byte-level BPE tokenizer
    (written from tokenizer.json). A SentencePiece model's token scores are not in tokenizer.json: they
    come from the GGUF the model was imported from (the registry rebuilds it from its package)."""
    from tunelab.export.gguf import byte_level_bpe
    from tunelab.models.gguf import MARKER
    from tunelab.models.registry import REGISTRY

    if byte_level_bpe(tokenizer) is not None:
        yield None
        return
    info = json.loads((folder / MARKER).read_text()) if (folder / MARKER).exists() else {}
    if info.get("name") in REGISTRY and REGISTRY[info["name"]].kind == "gguf":
        registered = REGISTRY[info["name"]]
        with registered.source(registered) as path:
            yield path
        return
    if info.get("source") and Path(info["source"]).is_file():
        yield Path(info["source"])
        return
    raise UserError(
        f"GGUF export: {folder} has a SentencePiece tokenizer, whose scores only a GGUF keeps, and "
        "it was not imported from one (`tunelab models pull FILE.gguf` imports a model with them)"
    )


def _name(target: str) -> str:
    path = Path(target)
    return path.parent.name if path.name == "final" else path.name
