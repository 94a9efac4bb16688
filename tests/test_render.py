"""Rendering: which tokens the loss sees, and that the prompt is the one inference uses."""

import pytest
from conftest import DATA
from tiny_tokenizer import base_tokenizer, chat_tokenizer

from tunelab.data.formats import load_records
from tunelab.data.records import Chat, Pair, Preference, message
from tunelab.data.render import IGNORE, Renderer
from tunelab.errors import UserError

CONVERSATION = Chat(
    [
        message("system", "Be brief."),
        message("user", "What is the capital of France?"),
        message("assistant", "Paris."),
        message("user", "And of Spain?"),
        message("assistant", "Madrid.", weight=0),  # shown to the model, not trained
        message("user", "Germany?"),
        message("assistant", "Berlin."),
    ],
    "chat.jsonl:1",
)


def trained_runs(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token  # labels are the ids themselves (the model shifts them)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def assert_prompts_match_inference(tokenizer, renderer, conversation, last_only=False) -> None:
    """Before every assistant turn, the training ids are exactly apply_chat_template(add_generation_prompt)."""
    [example] = renderer.chats([conversation])
    last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
    for i, m in enumerate(conversation.messages):
        if m["role"] != "assistant" or (last_only and i != last):
            continue
        history = [{"role": t["role"], "content": t["content"]} for t in conversation.messages[:i]]
        expected = tokenizer.apply_chat_template(
            history, chat_template=renderer.template, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert example.input_ids[: len(expected)] == list(expected)
        assert renderer.generation_prompt_ids(conversation.messages[:i]) == list(expected)


def test_only_weight_1_assistant_turns_and_their_end_tokens_are_trained():
    tok = chat_tokenizer()
    [example] = Renderer(tok).chats([CONVERSATION])
    assert trained_runs(tok, example) == ["Paris.<|im_end|>", "Berlin.<|im_end|>"]
    assert tok.decode(example.input_ids).endswith("Berlin.<|im_end|>\n")  # the template's newline: untrained


def test_the_prompt_of_every_turn_is_what_inference_sends():
    tok = chat_tokenizer()
    assert_prompts_match_inference(tok, Renderer(tok), CONVERSATION)


def test_a_model_without_chat_template_gets_alpaca_with_one_bos_and_eos_after_each_response():
    tok = base_tokenizer()
    renderer = Renderer(tok)
    [example] = renderer.chats([CONVERSATION])
    text = tok.decode(example.input_ids)
    assert text.startswith(
        "<bos>Be brief.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.<eos>"
    )
    assert example.input_ids.count(tok.bos_token_id) == 1
    assert trained_runs(tok, example) == ["Paris.<eos>", "Berlin.<eos>"]
    assert_prompts_match_inference(tok, renderer, CONVERSATION)


def test_alpaca_template_adds_no_bos_for_a_tokenizer_that_does_not(tmp_path):
    tok = chat_tokenizer()
    [example] = Renderer(tok, template="alpaca").chats([CONVERSATION])
    assert tok.decode(example.input_ids).startswith("Be brief.\n\n### Instruction:")


def test_a_user_jinja_template_is_used(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = chat_tokenizer()
    renderer = Renderer(tok, template=str(path))
    [example] = renderer.chats([CONVERSATION])
    assert tok.decode(example.input_ids).startswith("system: Be brief.\nuser: What is the capital")
    # 'assistant: ' ends in a space that byte-level BPE would merge into ' Paris': the last turn is cut
    # there so that its prompt is what inference sends; earlier turns stay as inference sees the history.
    assert trained_runs(tok, example) == [" Paris.<|im_end|>", "Berlin.<|im_end|>"]
    assert_prompts_match_inference(tok, renderer, CONVERSATION, last_only=True)
    single = Chat(CONVERSATION.messages[:3], "chat.jsonl:2")
    assert trained_runs(tok, renderer.chats([single])[0]) == ["Paris.<|im_end|>"]
    assert_prompts_match_inference(tok, renderer, single)


def test_a_template_that_never_ends_a_turn_is_refused(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(UserError, match="never learn to stop"):
        Renderer(chat_tokenizer(), template=str(path)).chats([CONVERSATION])


def test_unknown_template_and_chat_without_one_are_errors():
    with pytest.raises(UserError, match="nor a Jinja file"):
        Renderer(chat_tokenizer(), template="chatml-ish").chats([CONVERSATION])
    with pytest.raises(UserError, match="has no chat template"):
        Renderer(base_tokenizer(), template="chat").chats([CONVERSATION])


def test_a_conversation_the_template_rejects_is_marked_invalid_not_fatal():
    tok = chat_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with a user') }}"
        "{% endif %}" + tok.chat_template
    )
    good = Chat([message("user", "Hi"), message("assistant", "Hello")], "f:1")
    bad = Chat([message("assistant", "Hello"), message("user", "Hi"), message("assistant", "Yes")], "f:2")
    examples = Renderer(tok).chats([good, bad])
    assert [e.status for e in examples] == ["ok", "invalid"]
    assert "must start with a user" in examples[1].problem


def test_train_on_inputs_trains_every_token():
    tok = chat_tokenizer()
    [example] = Renderer(tok, train_on_inputs=True).chats([CONVERSATION])
    assert example.labels == example.input_ids


def long_chat(words: int) -> Chat:
    return Chat([message("user", "the sea is wide " * words), message("assistant", "Paris.")], "f:3")


def test_keep_response_cuts_the_prompt_start_and_keeps_bos_and_the_response():
    tok = base_tokenizer()
    full = Renderer(tok).chats([long_chat(40)])[0]
    [example] = Renderer(tok, max_length=40).chats([long_chat(40)])
    assert example.status == "truncated" and len(example.input_ids) == 40
    assert example.input_ids[0] == tok.bos_token_id
    assert example.input_ids[1:] == full.input_ids[-39:]
    assert trained_runs(tok, example) == ["Paris.<eos>"]


def test_drop_truncation_drops_and_a_response_longer_than_max_length_keeps_its_start():
    tok = chat_tokenizer()
    assert Renderer(tok, max_length=20, truncation="drop").chats([long_chat(40)])[0].status == "dropped"
    answer = Chat([message("user", "Hi"), message("assistant", "The sea is wide and blue " * 10)], "f:4")
    [example] = Renderer(tok, max_length=20).chats([answer])
    assert example.status == "truncated" and len(example.input_ids) == 20
    assert tok.decode(example.input_ids).startswith("<|im_start|>user\nHi")  # prompt kept, response cut


def test_an_example_left_with_no_trained_token_is_untrained():
    tok = chat_tokenizer()
    [example] = Renderer(tok, max_length=5).chats([long_chat(40)])
    assert example.status in ("truncated", "untrained")
    assert example.status == "untrained" or any(label != IGNORE for label in example.labels[1:])


def test_preference_renders_the_same_prompt_with_each_response():
    tok = chat_tokenizer()
    record = Preference([message("user", "Hi", 0)], "Hello, how can I help you today?", "Go away.", "p:1")
    [(chosen, rejected)] = Renderer(tok).preferences([record])
    prompt = Renderer(tok).generation_prompt_ids([message("user", "Hi")])
    assert chosen.input_ids[: len(prompt)] == rejected.input_ids[: len(prompt)] == prompt
    assert trained_runs(tok, chosen) == ["Hello, how can I help you today?<|im_end|>"]
    assert trained_runs(tok, rejected) == ["Go away.<|im_end|>"]


def test_pairs_render_as_a_prompted_user_turn_and_seq2seq_as_source_and_target():
    tok = chat_tokenizer()
    pair = Pair("the cat sat on the mat", "die Katze", where="t:1")
    [example] = Renderer(tok).pairs([pair], prompt="Translate into German: {source}")
    assert "user\nTranslate into German: the cat sat on the mat<|im_end|>" in tok.decode(example.input_ids)
    assert trained_runs(tok, example) == ["die Katze<|im_end|>"]
    [s2s] = Renderer(tok).seq2seq([pair])
    # the target ends with EOS (appended where the tokenizer does not add it), so the decoder learns to stop
    assert tok.decode(s2s.input_ids) == "the cat sat on the mat" and tok.decode(s2s.labels) == "die Katze<|im_end|>"


# --- the real models --------------------------------------------------------------------------------

LLMS = ["smollm2-135m-instruct", "gemma3-270m"]


@pytest.fixture(scope="module", params=LLMS)
def real_tokenizer(request):
    from transformers import AutoTokenizer

    from tunelab.models import pull

    return AutoTokenizer.from_pretrained(pull(request.param))


@pytest.mark.real
@pytest.mark.slow
def test_real_llms_train_exactly_the_responses_and_prompt_like_inference(real_tokenizer):
    tok = real_tokenizer
    renderer = Renderer(tok)
    [example] = renderer.chats([CONVERSATION])
    end = tok.eos_token  # <|im_end|> for SmolLM2 (ChatML); <eos> for Gemma-3 base (Alpaca template)
    assert trained_runs(tok, example) == [f"Paris.{end}", f"Berlin.{end}"]
    assert_prompts_match_inference(tok, renderer, CONVERSATION)
    if tok.chat_template is None:  # Gemma-3 base: the template's BOS, and not a second one from the tokenizer
        assert example.input_ids[0] == tok.bos_token_id and example.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.real
@pytest.mark.slow
def test_real_alpaca_file_renders_every_row_with_a_trained_response_ending_in_eos(real_tokenizer):
    records, _ = load_records(DATA / "instruct" / "alpaca_5000.json")
    examples = Renderer(real_tokenizer, max_length=2048).chats(records)
    assert len(examples) == 4998 and all(e.status == "ok" for e in examples)
    assert all(
        e.labels[-1] == real_tokenizer.eos_token_id or e.labels[-2] == real_tokenizer.eos_token_id for e in examples
    )


@pytest.mark.real
def test_labeled_text_for_an_encoder_keeps_its_special_tokens_when_truncated():
    from transformers import AutoTokenizer

    from tunelab.data.records import Labeled
    from tunelab.models import pull

    tok = AutoTokenizer.from_pretrained(pull("minilm-l6"))
    records = [Labeled("a fine film", "positive", where="s:1"), Labeled("dull " * 50, "negative", "and long", "s:2")]
    short, cut = Renderer(tok, max_length=16).labeled(records, {"negative": 0, "positive": 1})
    assert short.labels == [1] and short.status == "ok" and tok.decode(short.input_ids) == "[CLS] a fine film [SEP]"
    assert cut.labels == [0] and cut.status == "truncated" and len(cut.input_ids) == 16
    assert cut.input_ids[0] == tok.cls_token_id and cut.input_ids[-1] == tok.sep_token_id
