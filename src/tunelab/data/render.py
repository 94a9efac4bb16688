"""Rendering: canonical records become token ids and labels, together, in one place.

    renderer = Renderer(tokenizer, template="auto", max_length=1024)
    examples = renderer.chats(records)        # [Example(input_ids, labels, where, status)]

`labels` is aligned with `input_ids` (the model shifts them), -100 wherever the loss must not look.
Only assistant turns of weight 1 are trained, each with its end-of-turn token, so the model learns
to stop; system, user and weight-0 turns are -100 (all of it is trained with `train_on_inputs`).

A conversation is rendered to text by the chat template (the model's own, the Alpaca template for a
model without one, or the user's Jinja file), then tokenised once, as a whole, exactly as
`apply_chat_template(..., tokenize=True)` does it; the trained tokens are found through the character
spans of the trained turns. Tokenising the whole text (not pieces) is what makes the prompt of every
turn the same tokens that inference gives for it (`tests/test_render.py` checks this on the real models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.data.options import DEFAULTS
from tunelab.data.records import Chat, Labeled, Pair, Preference, message
from tunelab.errors import UserError

IGNORE = -100  # the label of a position the loss does not look at (torch's cross_entropy default)
TRUNCATION = ("keep_response", "drop")
TEMPLATES = ("auto", "chat", "alpaca", "hermes")  # or a path to a Jinja file
RenderFn = Callable[[list[dict], bool, list[dict] | None], str]  # (messages, add_generation_prompt, tools) -> text

# For models without a chat template (base models such as Gemma-3-270M): the Alpaca layout, as a
# Jinja chat template so that it is saved with the trained model and `apply_chat_template` works
# without tunelab. `{{ bos }}` is replaced by `{{ bos_token }}` for tokenizers that start every text
# with BOS themselves (Gemma does; SmolLM2 does not), so the template gives what the model saw in
# pre-training. Every response ends with EOS: that is how the model learns to stop.
ALPACA_TEMPLATE = (
    "{{ bos }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# Tool use for models whose own template takes no tools but speaks ChatML (<|im_start|>, <|im_end|>):
# SmolLM2, Qwen. The tools are listed in the system turn and calls written as Hermes / Qwen2.5 write them,
# `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which `tunelab serve` reads back as
# OpenAI's tool_calls; a tool's answer is a user turn in <tool_response> tags. (transformers renders with
# trim_blocks: a newline right after a tag is written as {{ '\n' }}.)
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\nFor each function call, "
    "return a "
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first %}"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}"
    "{% if loop.first and m['content'] %}{{ '\n' }}{% endif %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Example:
    """One rendered example.

    `status`: ok; truncated (cut to max_length); dropped (longer than max_length, truncation: drop);
    untrained (no trained token left); invalid (the template failed on it: `problem` says why).
    """

    input_ids: list[int]
    labels: list[int]
    where: str = ""
    status: str = "ok"
    problem: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "truncated")


class TemplateError(UserError):
    """The chat template cannot render a conversation (it raised, or it is not prefix-stable)."""


def chat_template_for(tokenizer, template: str = "auto") -> str:
    """The Jinja chat template a run uses, from `data.template`."""
    if template in ("auto", "chat") and tokenizer.chat_template:
        return tokenizer.chat_template
    if template == "chat":
        raise UserError(
            "data.template: chat, but this model's tokenizer has no chat template; use alpaca or a Jinja file"
        )
    if template in ("auto", "alpaca"):
        return ALPACA_TEMPLATE.replace("{{ bos }}", "{{ bos_token }}" if adds_bos(tokenizer) else "")
    if template == "hermes":
        return HERMES_TEMPLATE
    path = Path(template)
    if not path.is_file():
        raise UserError(f"data.template: {template!r} is not one of {', '.join(TEMPLATES)} nor a Jinja file")
    return path.read_text(encoding="utf-8")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with BOS by itself (Gemma's does; SmolLM2's does not)."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


class Renderer:
    """Turns records into `Example`s for one tokenizer and one set of data options."""

    def __init__(
        self,
        tokenizer,
        template: str = DEFAULTS.template,
        max_length: int = DEFAULTS.max_length,
        train_on_inputs: bool = DEFAULTS.train_on_inputs,
        truncation: str = DEFAULTS.truncation,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("rendering needs a fast (Rust) tokenizer: tokenizer.json beside the model")
        if truncation not in TRUNCATION:
            raise UserError(f"data.truncation: {truncation!r} is not one of: {', '.join(TRUNCATION)}")
        self.tokenizer = tokenizer
        self.template_option = template
        self.max_length = max_length
        self.train_on_inputs = train_on_inputs
        self.truncation = truncation
        self._resolved: tuple[str, RenderFn] | None = None  # on first use: an encoder has no template

    @property
    def template(self) -> str:
        """The Jinja chat template in use (checked once: its assistant turns must end in a special token)."""
        return self._resolve()[0]

    def _render(self, messages: list[dict], generation: bool, tools: list[dict] | None = None) -> str:
        return self._resolve()[1](messages, generation, tools or None)

    def check_takes_tools(self) -> None:
        """Tool-use data needs a template that shows the tools: said before anything is rendered."""
        if "tools" not in self.template:
            raise UserError(
                "the data has tools, and this chat template takes none (it would train calls to functions "
                "the model was never shown); set data.template: hermes (a built-in ChatML template with "
                "Hermes-style <tool_call> JSON, for models that speak ChatML: SmolLM2, Qwen), or use a model "
                "whose own template takes tools (Qwen2.5 / Qwen3, Llama 3.1+, Mistral)"
            )

    def _resolve(self) -> tuple[str, RenderFn]:
        if self._resolved is None:
            template = chat_template_for(self.tokenizer, self.template_option)
            self._resolved = template, _compile(template, self.tokenizer)
            self._check_end_token()
        return self._resolved

    # --- records of each type ----------------------------------------------------------------------

    def chats(self, records: Sequence[Chat]) -> list[Example]:
        """Chat records (instruction data) -> examples; one batched tokenizer call for all of them."""
        self.template  # noqa: B018 - resolve and check the template first: its problems are not per record
        if any(record.tools for record in records):
            self.check_takes_tools()
        texts, spans, failed = [], [], {}
        for i, record in enumerate(records):
            try:
                text, trained = self.chat_text(record.messages, record.tools)
            except TemplateError as e:
                failed[i], text, trained = str(e), "", []
            texts.append(text)
            spans.append(trained)
        if not records:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        all_ids, all_offsets = encoded["input_ids"], encoded["offset_mapping"]
        merged = [i for i in range(len(texts)) if _straddles(all_offsets[i], spans[i])]
        for i, (ids, offsets) in zip(
            merged, self._tokenize_at_turns([texts[i] for i in merged], [spans[i] for i in merged])
        ):
            all_ids[i], all_offsets[i] = ids, offsets
        examples = []
        for i, (record, ids, offsets) in enumerate(zip(records, all_ids, all_offsets)):
            if i in failed:
                examples.append(Example([], [], record.where, "invalid", failed[i]))
                continue
            labels = list(ids) if self.train_on_inputs else _labels(ids, offsets, spans[i])
            examples.append(self._fit(Example(list(ids), labels, record.where)))
        return examples

    def preferences(self, records: Sequence[Preference]) -> list[tuple[Example, Example]]:
        """Preference records -> (chosen, rejected) examples: the prompt, then each response as the answer."""
        chats = [Chat([*r.prompt, response], r.where, r.tools) for r in records for response in r.responses()]
        examples = self.chats(chats)
        return list(zip(examples[0::2], examples[1::2]))

    def pairs(self, records: Sequence[Pair], prompt: str = "{source}") -> list[Example]:
        """Source/target pairs for a decoder-only model: `prompt` (with {source}) as the user turn."""
        return self.chats(
            [
                Chat([message("user", prompt.format(source=r.source)), message("assistant", r.target)], r.where)
                for r in records
            ]
        )

    def seq2seq(self, records: Sequence[Pair]) -> list[Example]:
        """Source/target pairs for an encoder-decoder model: `input_ids` = source, `labels` = target ids."""
        tok, n = self.tokenizer, self.max_length
        if not records:  # no held-out pairs (a run without evaluation): tokenizers fail on an empty batch
            return []
        sources = tok([r.source for r in records], truncation=True, max_length=n)["input_ids"]
        targets = tok(text_target=[r.target for r in records], truncation=True, max_length=n)["input_ids"]
        eos = tok.eos_token_id
        # the decoder must learn to stop: T5's and BART's tokenizers end targets with EOS, others may not
        targets = [list(t) if eos is None or (t and t[-1] == eos) else [*t[: n - 1], eos] for t in targets]
        return [Example(list(s), t, r.where) for r, s, t in zip(records, sources, targets)]

    def labeled(self, records: Sequence[Labeled], label2id: dict) -> list[Example]:
        """Labelled text for a classifier: `labels` holds the one class id."""
        encoded = self._encode_texts(records)
        long = [i for i, ids in enumerate(encoded) if len(ids) > self.max_length]
        # the tokenizer's own truncation keeps the special tokens ([CLS] a [SEP] b [SEP])
        for i, ids in zip(
            long, self._encode_texts([records[i] for i in long], truncation=True, max_length=self.max_length)
        ):
            encoded[i] = ids
        cut = set(long)
        return [
            Example(list(ids), [label2id[r.label]], r.where, "truncated" if i in cut else "ok")
            for i, (r, ids) in enumerate(zip(records, encoded))
        ]

    def _encode_texts(self, records: Sequence[Labeled], **kwargs) -> list[list[int]]:
        """Token ids of each text (with its pair, if it has one), with the tokenizer's special tokens."""
        out: list[list[int]] = [[] for _ in records]
        for has_pair in (False, True):
            rows = [i for i, r in enumerate(records) if (r.text_pair is not None) == has_pair]
            if rows:
                pairs = [records[i].text_pair for i in rows] if has_pair else None
                ids = self.tokenizer([records[i].text for i in rows], pairs, **kwargs)["input_ids"]
                for i, row_ids in zip(rows, ids):
                    out[i] = row_ids
        return out

    # --- the pieces --------------------------------------------------------------------------------

    def chat_text(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation (with the `tools` it may call), and the character span of every trained
        assistant turn: its answer or its calls.

        A turn's span starts where the template's generation prompt for it ends (so the prompt is what
        inference sends) and ends after its end-of-turn token; whitespace the template puts after that
        token belongs to the next turn's prompt.
        """
        text = self._render(messages, False, tools)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("weight", 1) != 1:
                continue
            prompt = self._render(messages[:i], True, tools)
            upto = text if i == len(messages) - 1 else self._render(messages[: i + 1], False, tools)
            if not (text.startswith(upto) and upto.startswith(prompt)):
                raise TemplateError(
                    "the chat template renders earlier turns differently once later turns follow "
                    "(it is not prefix-stable), so turn-by-turn masks are ambiguous; train on the "
                    "last assistant turn only (weight 0 on the others) or use another template"
                )
            spans.append((len(prompt), len(upto.rstrip())))
        return text, spans

    def _tokenize_at_turns(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[list, list]]:
        """Tokenise texts in two pieces, cut where the last trained turn starts: (ids, offsets) per text.

        For a template whose generation prompt ends inside a word (`'assistant: '`), tokenising the
        whole text merges the prompt's last characters into the response's first token (' Paris'),
        while inference tokenises the prompt alone and ends it with its own token (' '). Cutting
        there makes training see the prompt tokens inference sends for the last turn; earlier turns
        stay as inference tokenises them inside that prompt's history. Only such texts take this path.
        """
        if not texts:
            return []
        cuts = [[0, turn_spans[-1][0], len(text)] for text, turn_spans in zip(texts, spans)]
        pieces = [text[a:b] for text, c in zip(texts, cuts) for a, b in zip(c, c[1:])]
        encoded = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
        out, k = [], 0
        for c in cuts:
            ids, offsets = [], []
            for start in c[:-1]:
                ids += encoded["input_ids"][k]
                offsets += [(s + start, e + start) for s, e in encoded["offset_mapping"][k]]
                k += 1
            out.append((ids, offsets))
        return out

    def generation_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The ids inference starts from: the conversation so far (with its tools) plus the generation prompt."""
        return self.tokenizer(self._render(messages, True, tools), add_special_tokens=False)["input_ids"]

    def _fit(self, example: Example) -> Example:
        """Apply max_length: drop, or cut the start of the prompt (keeping BOS) so the last response stays."""
        ids, labels, n = example.input_ids, example.labels, self.max_length
        if len(ids) > n:
            if self.truncation == "drop":
                example.status = "dropped"
                return example
            head = 1 if ids[0] == self.tokenizer.bos_token_id else 0
            trained = [i for i, label in enumerate(labels) if label != IGNORE]
            last_turn = _last_run_start(trained) if trained else len(ids)
            if len(ids) - last_turn <= n - head:  # the last trained turn fits: cut the prompt's start
                cut = len(ids) - (n - head)
                example.input_ids, example.labels = ids[:head] + ids[cut:], labels[:head] + labels[cut:]
            else:  # the response alone is longer than max_length: keep its start (it loses its EOS)
                example.input_ids, example.labels = ids[:n], labels[:n]
            example.status = "truncated"
        if all(label == IGNORE for label in example.labels[1:]):  # position 0 is never predicted
            example.status = "untrained"
        return example

    def end_of_turn(self) -> str | None:
        """The special token that ends an assistant turn in this template (what the model learns to stop
        on: an end-of-turn token, or EOS), or None when the turn ends in no special token."""
        ending = self._turn_ending()
        specials = [t for t in [*self.tokenizer.all_special_tokens, *self.tokenizer.get_added_vocab()] if t]
        return max((t for t in specials if ending.endswith(t)), key=len, default=None)

    def _turn_ending(self) -> str:
        """What the template writes after an assistant turn's content, within the trained span."""
        text, [(start, end)] = self.chat_text([message("user", "Hi"), message("assistant", "Hello")])
        return text[start:end].removeprefix("Hello")

    def _check_end_token(self) -> None:
        """A template whose assistant turns end in no special token would never teach the model to stop."""
        if self.end_of_turn() is None:
            raise UserError(
                f"the chat template ends an assistant turn with {self._turn_ending()!r}, no end-of-turn "
                "or EOS token: the model would never learn to stop. Add {{ eos_token }} after the "
                "assistant content in the template"
            )


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids where a token overlaps a trained span, IGNORE elsewhere."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2) character [start, end)
    keep = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        keep |= (bounds[:, 1] > a) & (bounds[:, 0] < b)
    return np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def _straddles(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> bool:
    """Whether a token runs across the start of the last trained span (from the prompt into the response)."""
    return bool(spans) and any(s < spans[-1][0] < e for s, e in offsets)


def _last_run_start(positions: list[int]) -> int:
    """The first position of the last run of consecutive positions: where the last trained turn begins."""
    i = len(positions) - 1
    while i > 0 and positions[i - 1] == positions[i] - 1:
        i -= 1
    return positions[i]


def _compile(template: str, tokenizer) -> RenderFn:
    """A function (messages, add_generation_prompt) -> text, with the variables templates expect.

    transformers compiles the same sandboxed Jinja environment inside `apply_chat_template`; calling the
    compiled template directly halves the time for 5,000 Alpaca rows (0.9 s -> 0.5 s) by skipping the
    per-call argument handling. If that private helper moves, `apply_chat_template` is the fallback.
    """
    variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - any change in the private helper: use the public path

        def render_public(messages: list[dict], generation: bool, tools: list[dict] | None) -> str:
            return tokenizer.apply_chat_template(
                messages, chat_template=template, tools=tools, tokenize=False, add_generation_prompt=generation
            )

        return render_public

    def render(messages: list[dict], generation: bool, tools: list[dict] | None) -> str:
        try:
            return compiled.render(messages=messages, tools=tools, add_generation_prompt=generation, **variables)
        except Exception as e:  # noqa: BLE001 - a template raising is the template's problem, told as such
            raise TemplateError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None

    return render
