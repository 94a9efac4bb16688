"""An Ollama Modelfile beside an exported GGUF: FROM, the chat template in Ollama's Go template language,
the default system prompt, and a stop parameter for the end-of-turn token.

Ollama renders prompts with Go's text/template, not Jinja, so a Jinja chat template cannot be copied:
it is recognised instead. Each layout tunelab knows (ChatML, as Qwen2.5, Qwen3 and SmolLM2 use it;
Llama 3's headers; Gemma's turns; Mistral's [INST]; Phi-3's; the Alpaca layout tunelab trains base
models with) is written twice, as a Python renderer and as a Go template; the run's Jinja template is
rendered on probe conversations and compared with each Python renderer, and the layout whose text is the
same, character for character, gives the Go template. A system prompt the template adds when there is
none becomes the Modelfile's SYSTEM; text it puts before every system prompt (Llama 3.1's knowledge and
today's dates) goes into the TEMPLATE (the date as on the day of the export). A template that refuses a
system turn (Gemma-2's) is compared on the conversations it takes. A template that matches none gets a
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


def _llama3(messages, system, eos):
    def turn(role, content):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"

    text = turn("system", system) if system is not None else ""
    for m in messages:
        text += turn(m["role"], m["content"])
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _gemma(messages, system, eos):
    text = ""
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else "user"
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        text += f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _mistral(messages, system, eos):
    """Mistral's Tekken layout (Mistral-Nemo, Ministral): the system prompt goes into the last user turn."""
    text = ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            prefix = f"{system}\n\n" if system is not None and i == len(messages) - 1 else ""
            text += f"[INST]{prefix}{m['content']}[/INST]"
        else:
            text += f"{m['content']}{eos}"
    return text


def _phi3(messages, system, eos):
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    for m in messages:
        text += f"<|{m['role']}|>\n{m['content']}<|end|>\n"
    return text + "<|assistant|>\n"


def _alpaca(messages, system, eos):
    text = f"{system}\n\n" if system is not None else ""
    for m in messages:
        text += (
            f"### Instruction:\n{m['content']}\n\n"
            if m["role"] == "user"
            else f"### Response:\n{m['content']}{eos}\n\n"
        )
    return text + "### Response:\n"


# The Go templates read the system prompt from `$system` (Ollama's `.System`, or text before it: `modelfile`
# defines it), `{{ "EOS" }}` stands for the tokenizer's end-of-sequence text.
LAYOUTS = [
    Layout(
        "ChatML",
        _chatml,
        (
            "{{- if $system }}<|im_start|>system\n{{ $system }}<|im_end|>\n{{ end }}"
            '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
            "<|im_start|>assistant\n"
        ),
        ("<|im_start|>",),
    ),
    Layout(
        "Llama 3",
        _llama3,
        (
            "{{- if $system }}<|start_header_id|>system<|end_header_id|>\n\n{{ $system }}<|eot_id|>{{ end }}"
            '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
            "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        ("<|start_header_id|>",),
    ),
    Layout(
        "Gemma",
        _gemma,
        (
            '{{- $first := true }}{{- range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
            "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $first = false }}"
            '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
            "<start_of_turn>model\n"
        ),
        ("<start_of_turn>",),
    ),
    Layout(
        "Mistral",
        _mistral,
        (
            '{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST]'
            "{{ if and $system (eq (len (slice $.Messages $i)) 1) }}{{ $system }}\n\n{{ end }}{{ .Content }}[/INST]"
            '{{ else if eq .Role "assistant" }}{{ .Content }}{{ "EOS" }}{{ end }}{{ end }}'
        ),
        ("[INST]",),
    ),
    Layout(
        "Phi-3",
        _phi3,
        (
            "{{- if $system }}<|system|>\n{{ $system }}<|end|>\n{{ end }}"
            '{{- range .Messages }}{{ if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}'
            "<|assistant|>\n"
        ),
        ("<|user|>",),
    ),
    Layout(
        "Alpaca",
        _alpaca,
        (
            "{{- if $system }}{{ $system }}\n\n{{ end }}"
            '{{- range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{{ "EOS" }}\n\n{{ end }}{{ end }}'
            "### Response:\n"
        ),
        ("### Instruction:",),
    ),
]


@dataclass(frozen=True)
class Found:
    """A recognised template: its layout, the system prompt it adds when there is none (for SYSTEM), and
    the text it puts before every system prompt (for the TEMPLATE; "" when none)."""

    layout: Layout
    system: str | None
    preamble: str = ""


def modelfile(gguf_name: str, tokenizer, end_of_turn: str) -> str:
    """The Modelfile text for `gguf_name` (beside it), from the tokenizer's chat template."""
    import json

    lines = [
        f"# Ollama: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
    ]
    found = recognise(tokenizer) if tokenizer.chat_template else None
    if found is None:
        names = ", ".join(layout.name for layout in LAYOUTS)
        lines.append(
            f"# TEMPLATE: this chat template is none of the layouts tunelab translates ({names});"
            " Ollama reads the GGUF's tokenizer.chat_template instead"
        )
    else:
        system = "{{- $system := .System }}"
        if found.preamble:  # a Go string literal: JSON's escapes are Go's
            system = f"{{{{- $system := print {json.dumps(found.preamble)} .System }}}}"
        go = system + found.layout.go.replace('{{ "EOS" }}', tokenizer.eos_token or "")
        lines.append(f'TEMPLATE """{go}"""')
        if found.system is not None:
            lines.append(f'SYSTEM """{found.system}"""')
    stops = [end_of_turn, *(found.layout.stops if found else ())]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def recognise(tokenizer) -> Found | None:
    """The layout whose rendering equals the chat template's on every probe conversation it renders (a
    template may refuse the system turn, not the others), with its default system prompt and preamble;
    or None."""
    rendered = [_jinja(tokenizer, probe) for probe in PROBES]
    first = rendered[0]
    if first is None or any(
        text is None and not any(m["role"] == "system" for m in probe) for probe, text in zip(PROBES, rendered)
    ):
        return None
    eos = tokenizer.eos_token or ""
    for layout in LAYOUTS:
        default = _default_system(layout, first, tokenizer)
        for preamble in ("", default) if default else ("",):
            if all(
                text is None or layout.render(turns, _system(probe, default, preamble), eos) == text
                for probe, text in zip(PROBES, rendered)
                for turns in [[m for m in probe if m["role"] != "system"]]
            ):
                return Found(layout, None if preamble else default, preamble or "")
    return None


def _system(probe: list[dict], default: str | None, preamble: str) -> str | None:
    """The system prompt a layout shows for `probe`: its own (after the preamble), else the default."""
    own = next((m["content"] for m in probe if m["role"] == "system"), None)
    if own is None:
        return default
    return preamble + own


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
