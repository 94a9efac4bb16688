"""A LoRA run as vLLM serves it: the adapter directory, checked against what vLLM accepts, and the command.

    tunelab export runs/sft-smollm2-alpaca sft-vllm --format vllm
    sh sft-vllm/serve.sh        # vllm serve BASE --enable-lora --lora-modules NAME=DIR --max-lora-rank R ...

vLLM loads a peft adapter directory (adapter_config.json and adapter_model.safetensors) on top of the base
model it serves, and refuses some adapters only when the server starts. The rules below are vLLM 0.33's,
read for facts from its `vllm/lora/peft_helper.py` (`PEFTHelper.validate_legal`), `vllm/lora/utils.py`
(`parse_fine_tuned_lora_name`), `vllm/lora/worker_manager.py` (the modules it expects) and
`vllm/config/lora.py` (the ranks `--max-lora-rank` takes); a run vLLM would refuse is refused here with
vLLM's reason and the fix. vLLM itself is a CUDA build and cannot be installed beside tunelab on a CPU
machine; `benchmarks/vllm_handoff.py` runs the exported adapter in vLLM where there is a GPU.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tunelab.errors import UserError

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (default 16)
INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "lora_ga")  # init_lora_weights it takes
HEADS = ("classifier", "score")  # the only modules_to_save it loads (a classification model's head)
# Model types whose vLLM model class declares its embeddings (`embedding_modules`): LoRA on embed_tokens or
# lm_head loads only there (not on Qwen2, Gemma or Mistral)
EMBEDDING_LORA = ("llama", "qwen3", "qwen3_moe", "mixtral", "granite", "minicpm", "exaone", "nemotron")
# A tensor name vLLM parses (after an optional `base_model.model.`): a LoRA matrix, an embedding's, or a head
TENSOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
HEAD_TENSOR = re.compile(r"(?:.+\.)?(classifier|score)(?:\.\w+)*\.(weight|bias)$")
SKIPPED = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")  # peft saves them; vLLM skips them
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_vllm(folder: Path, out: Path, name: str) -> Path:
    """The adapter in `folder` (a LoRA run's final/) as a directory `out` vLLM serves, with `serve.sh`."""
    from tunelab.fs import atomic_dir

    config = _adapter_config(folder)
    refused = problems(config, _tensor_names(folder / "adapter_model.safetensors"), _model_type(config))
    if refused:
        raise UserError(
            f"--format vllm: vLLM would refuse this adapter: {'; '.join(refused)}. Export the merged model "
            f"instead (`tunelab export RUN OUT --format safetensors`) and serve that (`vllm serve OUT`)"
        )
    rank = _rank(config)
    if out.exists():  # replaced (export checked --force) only now that the adapter is known to be taken
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    with atomic_dir(out) as tmp:
        for file in (*ADAPTER_FILES, *TOKENIZER_FILES, "README.md"):
            if (folder / file).exists():
                shutil.copy2(folder / file, tmp / file)
        (tmp / "serve.sh").write_text(serve_script(config["base_model_name_or_path"], name, rank, tmp))
        (tmp / "serve.sh").chmod(0o755)
    return out


def problems(config: dict, tensors: list[str], model_type: str | None) -> list[str]:
    """What vLLM 0.33 refuses in an adapter with this adapter_config.json and these tensor names, in vLLM's
    words (empty: it loads)."""
    found = []
    rank = _rank(config)
    if rank > MAX_LORA_RANKS[-1]:
        found.append(f"LoRA rank {rank} is greater than the largest max_lora_rank ({MAX_LORA_RANKS[-1]})")
    extra = [m for m in config.get("modules_to_save") or [] if m not in HEADS]
    if extra:
        found.append(f"it loads modules_to_save only as a classifier or score head, not {extra}")
    if config.get("use_dora"):
        found.append("it does not support DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append("adapter bias is not supported")
    if config.get("init_lora_weights", True) not in INITS:
        found.append(f"init_lora_weights={config['init_lora_weights']!r} changes the base model's weights")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(key):
            found.append(f"it does not support {key}")
    unparsed = [n for n in tensors if not (TENSOR.match(n) or HEAD_TENSOR.match(n) or n.endswith(SKIPPED))]
    if unparsed:
        found.append(
            f"{unparsed[0]} is an unsupported LoRA weight"
            + (f" (and {len(unparsed) - 1} more)" if len(unparsed) > 1 else "")
        )
    embedded = sorted(
        {
            m.group(1).rsplit(".", 1)[-1]
            for n in tensors
            if (m := TENSOR.match(n)) and m.group(1).endswith(("embed_tokens", "lm_head"))
        }
    )
    if embedded and model_type not in EMBEDDING_LORA:
        found.append(f"LoRA on {', '.join(embedded)} loads only where vLLM's model declares its embeddings, "
                     f"and its {model_type or 'base'} model does not")  # fmt: skip
    return found


def smallest_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM takes that holds `rank`."""
    return next(r for r in MAX_LORA_RANKS if r >= rank)


def serve_script(base: str, name: str, rank: int, folder: Path) -> str:
    """A POSIX shell script that serves the adapter beside it on `base` with vLLM (extra flags pass on)."""
    import shlex

    here = '"$(cd "$(dirname "$0")" && pwd)"'  # an absolute path: vLLM takes a relative one for a Hub repo
    template = f" \\\n  --chat-template {here}/chat_template.jinja" if (folder / "chat_template.jinja").exists() else ""
    return (
        "#!/bin/sh\n"
        f"# vLLM serves the LoRA adapter in this directory as the model {shlex.quote(name)} on its base model\n"
        "# (the base is named as the run named it: a Hub name, or a directory that must exist where this runs).\n"
        f'# Requests name the adapter: {{"model": "{name}", ...}}. Written by `tunelab export --format vllm`.\n'
        f"exec vllm serve {shlex.quote(base)} --enable-lora \\\n"
        f"  --lora-modules {shlex.quote(name)}={here} \\\n"
        f'  --max-lora-rank {smallest_rank(rank)}{template} "$@"\n'
    )


def _rank(config: dict) -> int:
    """The largest rank of an adapter: its `r`, or a larger one its `rank_pattern` gives some modules."""
    return max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])


def _adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.exists():
        raise UserError(
            f"--format vllm: {folder} is not a LoRA adapter (a run with tuning.mode lora); vLLM serves a whole "
            "model directly: `tunelab export RUN OUT --format safetensors`, then `vllm serve OUT`"
        )
    if not (folder / "adapter_model.safetensors").exists():
        raise UserError(f"--format vllm: {folder} has no adapter_model.safetensors")
    return json.loads(path.read_text())


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _model_type(config: dict) -> str | None:
    """The base model's type, where its config can be read here (a directory, or a registry model)."""
    from transformers import AutoConfig

    from tunelab.models.resolve import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(config["base_model_name_or_path"], prepare=False)).model_type
    except (UserError, OSError, ValueError):
        return None
