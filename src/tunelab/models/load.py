"""Loading models, the one place: for inference (a model, or a peft adapter on its base), and for
training (the model a run starts from, with `tuning.*` applied).

Every loader takes a resolved model directory (`models.resolve_model`); weights load in float32 and
autocast decides the compute precision (`train.precision`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.models.tuning import TuningSpec

HEADS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


# --- what a directory holds -----------------------------------------------------------------------------


def base_folder(folder: Path, prepare: bool = True) -> Path:
    """The model directory itself, or, for a peft adapter directory, the base model it was trained on
    (with `prepare=False`, a base that is not installed yet is a UserError: nothing is installed)."""
    adapter = folder / "adapter_config.json"
    if adapter.exists() and not (folder / "config.json").exists():
        from tunelab.models.resolve import resolve_model

        return resolve_model(json.loads(adapter.read_text())["base_model_name_or_path"], prepare)
    return folder


def check_causal_lm(folder: Path, purpose: str = "generation") -> None:
    """A UserError unless the model in `folder` is a causal (decoder-only) LM."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        found = ", ".join(architectures) or "no architecture named in config.json"
        raise UserError(f"{folder}: {purpose} needs a causal LM, and this model is {found}")


def is_encoder_decoder(folder: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(folder), "is_encoder_decoder", False))


def pad_with_eos(tokenizer):
    """The tokenizer, padding with EOS when it has no pad token (decoder LMs; a pad id of 0 is valid)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the pad token's, else EOS (never trained, never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def quiet_loading() -> None:
    """No weight-loading bars from transformers: they would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --- for inference ------------------------------------------------------------------------------------


def load_model(folder: Path, auto_class, dtype: torch.dtype = torch.float32, merged: bool = False):
    """`(model, tokenizer)` from a local HF directory, or a peft adapter on its base model; eval mode.

    The tokenizer comes from `folder`: a tunelab run saves the chat template it trained with there (an
    adapter saved without one, as peft's `save_pretrained` leaves it, takes its base's). `merged`: an
    adapter is merged into its base in fp32 and the sum cast to `dtype` (the model as `final/`'s merged
    export holds it), instead of run beside the base layers at every step.
    """
    from transformers import AutoTokenizer

    base = base_folder(folder)
    adapter = base != folder
    model = auto_class.from_pretrained(base, dtype=torch.float32 if adapter and merged else dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
        if merged:  # safe_merge: the sum in a new tensor, never written into the mapped checkpoint's pages
            model = model.merge_and_unload(safe_merge=True).to(dtype)
    has_tokenizer = any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    return model.eval(), AutoTokenizer.from_pretrained(folder if has_tokenizer else base)


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32, merged: bool = False):
    """`(model, tokenizer)` of a causal LM (or an adapter on one), as `load_model`."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(base_folder(folder))
    return load_model(folder, AutoModelForCausalLM, dtype, merged)


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype a model is loaded in to run inference at `precision` (bf16, fp16, else fp32)."""
    from tunelab.precision import compute_dtype

    return compute_dtype(precision) or torch.float32


def inference_dtype(precision: str) -> torch.dtype:
    """The weights' dtype for `precision` (fp32, bf16, fp16, or auto: bf16 where this machine does it natively)."""
    from tunelab.precision import resolve_precision, training_device

    return weights_dtype(resolve_precision(precision, training_device()).name)


def load_generator(folder: Path, dtype: torch.dtype = torch.float32, merged: bool = False):
    """`(model, tokenizer, encoder_decoder)` of a model that writes text: a causal LM or an encoder-decoder
    (T5, BART), or an adapter on one (`merged`: merged into it, as `load_model`); eval mode."""
    from transformers import AutoModelForSeq2SeqLM

    if is_encoder_decoder(base_folder(folder)):
        return (*load_model(folder, AutoModelForSeq2SeqLM, dtype, merged), True)
    return (*load_causal_lm(folder, dtype, merged), False)


def load_classifier_run(folder: Path):
    """(model in eval mode, tokenizer, class names in id order) of a trained sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = pad_with_eos(AutoTokenizer.from_pretrained(folder))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, tokenizer, names


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as plain transformers loads it: a LoRA adapter merged into a copy of its base."""
    if not hasattr(model, "merge_and_unload"):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]  # a peft model


# --- for training ---------------------------------------------------------------------------------------


def tuned_model(
    folder: Path, tuning: TuningSpec, seed: int, neftune_alpha: float | None = None, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """A pretrained causal LM (or encoder-decoder, `SEQ_2_SEQ_LM`) with `tuning` applied (and NEFTune's
    embedding noise with `neftune_alpha`, train.neftune_alpha); seeded by `seed` (train.seed), so that a
    fresh adapter starts the same every time."""
    import transformers

    from tunelab.models.tuning import add_neftune, apply_tuning

    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[task_type]).from_pretrained(folder, dtype=torch.float32)
    model = apply_tuning(model, tuning, task_type=task_type)
    if neftune_alpha is not None:
        add_neftune(model, neftune_alpha)
    return model


def load_classifier(folder: Path, names: list[str]):
    """(a sequence classifier with a fresh head of len(names) outputs, the names of the parameters
    from_pretrained initialised: that head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(folder)
    kwargs: dict[str, Any] = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of the missing head: expected, and announced by the run
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, **kwargs
        )
    except ValueError as e:
        raise UserError(
            f"{folder}: {config.model_type} models have no sequence-classification head in "
            f"transformers ({str(e).splitlines()[0]})"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    return model, sorted(info["missing_keys"])


def tuned_classifier(folder: Path, tokenizer, names: list[str], tuning: TuningSpec, seed: int):
    """(the sequence classifier with `tuning` applied, seeded by `seed`; its fresh head's parameter names);
    a decoder LM without a pad token pads with EOS (the head reads the last real token)."""
    from tunelab.models.tuning import apply_tuning

    pad_with_eos(tokenizer)
    torch.manual_seed(seed)
    model, head = load_classifier(folder, names)
    model.config.pad_token_id = tokenizer.pad_token_id
    return apply_tuning(model, tuning, head=head, task_type="SEQ_CLS"), head


def starting_policy(folder: Path, tuning: TuningSpec, seed: int, purpose: str):
    """The causal LM a preference method starts from, with `tuning` applied (seeded by `seed`), and its
    tokenizer. An adapter (a LoRA run's final/) is merged into its base first: the policy, and the
    reference it is held to, are the tuned model."""
    from tunelab.models.tuning import apply_tuning

    check_causal_lm(base_folder(folder), purpose)
    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(folder)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    pad_with_eos(tokenizer)
    for module in model.modules():  # the policy and its reference must score a text alike: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return apply_tuning(model.train(), tuning), tokenizer


def merges_at_the_end(folder: Path, model: torch.nn.Module) -> bool:
    """Whether final/ must be a merged checkpoint: the run started from an adapter (merged into the
    policy), so an adapter saved on the original base would lack that first update."""
    return base_folder(folder) != folder and hasattr(model, "merge_and_unload")
