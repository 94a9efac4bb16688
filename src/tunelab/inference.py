"""Generation from a causal LM: the prompt goes through the model's chat template when it has one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError


def check_causal_lm(folder: Path, purpose: str = "generation") -> None:
    """A UserError unless the model in `folder` is a causal (decoder-only) LM."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        found = ", ".join(architectures) or "no architecture named in config.json"
        raise UserError(f"{folder}: {purpose} needs a causal LM, and this model is {found}")


def base_folder(folder: Path) -> Path:
    """The model directory itself, or, for a peft adapter directory, the base model it was trained on."""
    adapter = folder / "adapter_config.json"
    if adapter.exists() and not (folder / "config.json").exists():
        from tunelab.models import resolve_model

        return resolve_model(json.loads(adapter.read_text())["base_model_name_or_path"])
    return folder


def load_model(folder: Path, auto_class):
    """`(model, tokenizer)` from a local HF directory, or a peft adapter on its base model; eval mode.

    The tokenizer comes from `folder`: a tunelab run saves the chat template it trained with there.
    """
    import torch
    from transformers import AutoTokenizer

    base = base_folder(folder)
    model = auto_class.from_pretrained(base, dtype=torch.float32)
    if base != folder:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def load_causal_lm(folder: Path):
    """`(model, tokenizer)` of a causal LM (or an adapter on one), as `load_model`."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(base_folder(folder))
    return load_model(folder, AutoModelForCausalLM)


def prompt_ids(tokenizer, messages: list[dict] | str, raw: bool = False):
    """(1, T) ids: the conversation through the chat template plus the generation prompt, or the raw text.

    With the tokenizer a tunelab run saved, this is the template and rendering training used (the
    render tests check that `apply_chat_template` gives the training prompt tokens exactly).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template and not raw:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(messages[-1]["content"], return_tensors="pt").input_ids


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


def generate(model, tokenizer, messages: list[dict] | str, sampling: Sampling | None = None, raw: bool = False,
             stream: bool = False) -> str:  # fmt: skip
    """The model's reply to `messages` (or one prompt); with `stream`, printed as it comes."""
    import torch
    from transformers import TextStreamer

    sampling = sampling or Sampling()
    ids = prompt_ids(tokenizer, messages, raw)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    sample = sampling.temperature > 0
    options = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} if sample else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **options,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def chat(model, tokenizer, sampling: Sampling, read=None, write=print) -> None:
    """An interactive conversation: each reply streams as it is generated; the history is kept.

    /reset forgets the history, /system TEXT sets a system prompt, /exit (or end of input) leaves.
    """
    read = read or input  # looked up now, so that a test (or a wrapper) can replace it
    history: list[dict] = []
    system: list[dict] = []
    write("chat: /reset forgets the conversation, /system TEXT sets a system prompt, /exit leaves")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system = [{"role": "system", "content": line.removeprefix("/system").strip()}]
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        write("model> ", end="")
        reply = generate(model, tokenizer, system + history, sampling, stream=True)
        history.append({"role": "assistant", "content": reply})


def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128, num_beams: int = 1,
                   batch_size: int = 16, stop: tuple[str, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, description: str = "generating") -> list[str]:  # fmt: skip
    """The model's continuation of every prompt (token ids), in the prompts' order.

    Prompts go in batches of similar length (left-padded for a decoder, right-padded as encoder input
    for an encoder-decoder); generation stops at the end-of-turn / EOS tokens, and the text is cut at
    the first of `stop`. Greedy (or beam search) unless `temperature` > 0; sampling is seeded, so the
    same call gives the same texts. A progress bar with generated tokens/s shows on a terminal.
    """
    import torch

    from tunelab.progress import TokenProgress

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    sample = temperature > 0
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {"do_sample": False}
    stop = tuple(s for s in stop if s)
    device = next(model.parameters()).device
    with TokenProgress(description, len(prompts)) as bar, torch.no_grad():
        torch.manual_seed(seed)
        for k in range(0, len(order), batch_size):
            rows = order[k : k + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(rows):
                n = len(prompts[i])
                span = slice(0, n) if encoder_decoder else slice(width - n, width)
                ids[b, span], mask[b, span] = torch.as_tensor(prompts[i]), 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, pad_token_id=pad, **options,
                                 **_stopping(tokenizer, stop, 0 if encoder_decoder else width))  # fmt: skip
            new = out if encoder_decoder else out[:, width:]
            for b, i in enumerate(rows):
                text = tokenizer.decode(new[b], skip_special_tokens=True)
                cuts = [text.find(s) for s in stop if s in text]
                texts[i] = (text[: min(cuts)] if cuts else text).strip()
            bar.advance(len(rows), int((new != pad).sum()))
    return texts


def _stopping(tokenizer, stop: tuple[str, ...], start: int) -> dict:
    """generate() options that end a row once its generated text holds one of `stop`.

    transformers' own `stop_strings` also matches a stop string that begins in the prompt (a prompt
    ending in a newline stops a "\n\n" at the first newline generated); this looks only at the new text.
    """
    if not stop:
        return {}
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenWritten(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,) bool: the row is done
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([StopWhenWritten()])}
