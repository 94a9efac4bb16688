"""What a model reads when it is asked: the prompt token ids, rendered as training rendered them."""

from __future__ import annotations


def encode_prompt(tokenizer, messages: list[dict] | str, raw: bool = False, tools: list[dict] | None = None):
    """(1, T) ids: the conversation through the chat template plus the generation prompt (with `tools`, as
    the template shows them), or the raw text.

    With the tokenizer a tunelab run saved, this is the template and rendering training used (the
    render tests check that `apply_chat_template` gives the training prompt tokens exactly).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template and not raw:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(messages[-1]["content"], return_tensors="pt").input_ids


def task_prompts(records, tokenizer, renderer, encoder_decoder: bool, prompt: str, max_length: int) -> list[list[int]]:
    """What a task model reads for each (source, target) record: the source itself (an encoder-decoder),
    or the user turn `prompt` made from it, rendered with the generation prompt (a decoder; its last
    `max_length` tokens)."""
    if encoder_decoder:
        return tokenizer([r.source for r in records], truncation=True, max_length=max_length)["input_ids"]
    out = []
    for r in records:
        ids = renderer.generation_prompt_ids([{"role": "user", "content": prompt.format(source=r.source)}])
        out.append(ids[-max_length:])
    return out
