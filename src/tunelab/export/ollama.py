"""An Ollama Modelfile beside an exported GGUF: FROM, the chat template in Ollama's Go template language,
the default system prompt, and a stop parameter for the end-of-turn token.

Ollama renders prompts with Go's text/template, not Jinja, so a Jinja chat template cannot be copied:
it is recognised instead. Each layout tunelab knows (ChatML, Gemma's turns, the Alpaca layout tunelab
trains base models with) is written twice, as a Python renderer and as a Go template; the run's Jinja
template is rendered on probe conversations and compared with each Python renderer, and the layout whose
text is the same, character for character, gives the Go template. A template that matches none gets a
Modelfile without TEMPLATE (Ollama then falls back to the GGUF's own `tokenizer.chat_template`, which it
recognises for common models), and says so in a comment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}],
]


@dataclass(frozen=True)
class Layout:
    name: str
    render: Callable[[list[dict], str | None, str], str]  # (messages, system prompt or None, eos text) -> prompt
    go: str  # the same layout as an Ollama TEMPLATE
    stops: tuple[str, ...]  # besides the end-of-turn token


def _chatml(messages, system, eos):
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _gemma(messages, system, eos):
    text = ""
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else "user"
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        text += f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _alpaca(messages, system, eos):
    text = f"{system}\n\n" if system is not None else ""
    for m in messages:
        text += (
            f"### Instruction:\n{m['content']}\n\n"
            if m["role"] == "user"
            else f"### Response:\n{m['content']}{eos}\n\n"
        )
    return text + "### Response:\n"


LAYOUTS = [
    Layout(
        "ChatML",
        _chatml,
        (
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
            "<|im_start|>assistant\n"
        ),
        ("<|im_start|>",),
    ),
    Layout(
        "Gemma",
        _gemma,
        (
            '{{- $first := true }}{{- range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
            "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}"
            '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
            "<start_of_turn>model\n"
        ),
        ("<start_of_turn>",),
    ),
    Layout(
        "Alpaca",
        _alpaca,
        (
            "{{- if .System }}{{ .System }}\n\n{{ end }}"
            '{{- range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{{ "EOS" }}\n\n{{ end }}{{ end }}'
            "### Response:\n"
        ),
        ("### Instruction:",),
    ),
]


def modelfile(gguf_name: str, tokenizer, end_of_turn: str) -> str:
    """The Modelfile text for `gguf_name` (beside it), from the tokenizer's chat template."""
    lines = [
        f"# Ollama: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    found = recognise(tokenizer) if tokenizer.chat_template else None
    if found is None:
        lines.append(
            "# TEMPLATE: this chat template is none of the layouts tunelab translates (ChatML, Gemma, Alpaca);"
            " Ollama reads the GGUF's tokenizer.chat_template instead"
        )
    else:
        layout, system = found
        go = layout.go.replace('{{ "EOS" }}', tokenizer.eos_token or "")
        lines.append(f'TEMPLATE """{go}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
    stops = [end_of_turn, *(found[0].stops if found else ())]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def recognise(tokenizer) -> tuple[Layout, str | None] | None:
    """(the layout, its default system prompt or None) whose rendering equals the chat template's on
    every probe conversation, or None."""
    rendered = [text for probe in PROBES if (text := _jinja(tokenizer, probe)) is not None]
    if len(rendered) < len(PROBES):
        return None
    for layout in LAYOUTS:
        default = _default_system(layout, rendered[0], tokenizer)
        for probe, text in zip(PROBES, rendered):
            system = next((m["content"] for m in probe if m["role"] == "system"), default)
            turns = [m for m in probe if m["role"] != "system"]
            if layout.render(turns, system, tokenizer.eos_token or "") != text:
                break
        else:
            return layout, default
    return None


def _default_system(layout: Layout, rendered: str, tokenizer) -> str | None:
    """The system prompt a template adds when the conversation has none (SmolLM2's does), found by
    rendering the layout with a marker and reading what the template put in its place."""
    marker = "\x00SYSTEM\x00"
    shape = layout.render(PROBES[0], marker, tokenizer.eos_token or "")
    head, tail = shape.split(marker)
    if rendered.startswith(head) and rendered.endswith(tail) and len(rendered) > len(head) + len(tail):
        return rendered[len(head) : len(rendered) - len(tail)]
    return None


def _jinja(tokenizer, messages: list[dict]) -> str | None:
    """The template's text for `messages` plus the generation prompt, without a BOS the runtime adds."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a system turn, or alternation: not one we translate
        return None
    from tunelab.data.render import adds_bos

    bos = tokenizer.bos_token  # the runtime adds it when the tokenizer does (add_bos_token in the GGUF)
    return text[len(bos) :] if adds_bos(tokenizer) and text.startswith(bos) else text
