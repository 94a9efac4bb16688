"""Generation from a causal LM: the prompt goes through the model's chat template when it has one."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError


def check_causal_lm(folder: Path, purpose: str = "generation") -> None:
    """A UserError unless the model in `folder` is a causal (decoder-only) LM."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        found = ", ".join(architectures) or "no architecture named in config.json"
        raise UserError(f"{folder}: {purpose} needs a causal LM, and this model is {found}")


def load_causal_lm(folder: Path):
    """`(model, tokenizer)` from a local HF directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_causal_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, raw: bool = False):
    """(1, T) ids: the chat template's user turn plus the generation prompt, or the raw text."""
    if tokenizer.chat_template and not raw:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, raw: bool = False, stream: bool = False) -> str:
    """Greedy continuation of `prompt`; with `stream`, tokens are printed as they come."""
    import torch
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, prompt, raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
