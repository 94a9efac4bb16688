"""Tool-use training data: OpenAI's function-calling rows (and LLaMA-Factory's and Axolotl's layouts)
read, checked by file and line, rendered through a template that takes tools with the loss on the
assistant's calls and answers, and written back by `data convert`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import run_cli
from helpers import WEATHER
from tiny_tokenizer import chat_tokenizer

from tunelab.data.formats import load_records
from tunelab.data.render import IGNORE, Renderer
from tunelab.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}  # fmt: skip
ROW = {
    "tools": [WEATHER],
    "parallel_tool_calls": False,
    "messages": [
        {"role": "system", "content": "You answer about the weather."},
        {"role": "user", "content": "How warm is it in Paris?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
}


def broken(change) -> dict:
    row = copy.deepcopy(ROW)
    change(row)
    return row


def arguments(text: str):
    return lambda row: row["messages"][2]["tool_calls"][0]["function"].__setitem__("arguments", text)


# each row, and the problem `tunelab data validate` names on its line
PROBLEMS = [
    (arguments('{"city": "Paris", "unit": '), "messages[2].tool_calls[0].function.arguments: not valid JSON"),
    (
        arguments('{"city": "Paris"}'),
        "messages[2].tool_calls[0]: arguments do not match get_weather's parameters: 'unit' is a required property",
    ),
    (
        arguments('{"city": "Oslo", "unit": "celsius"}'),
        "messages[2].tool_calls[0]: arguments do not match get_weather's parameters: 'Oslo' is not one of "
        "['Paris', 'Rome'] (at ['city'])",
    ),
    (
        lambda row: row["messages"][2]["tool_calls"][0]["function"].__setitem__("name", "get_time"),
        "messages[2].tool_calls[0]: calls 'get_time', which the row's tools do not declare (declared: get_weather)",
    ),
    (
        lambda row: row["messages"][3].__setitem__("tool_call_id", "call_9"),
        "messages[3] (tool): tool_call_id 'call_9' answers no earlier call (open calls: call_1)",
    ),
    (lambda row: row["messages"].pop(), "the conversation ends on a tool message"),
    (
        lambda row: row["messages"][2]["tool_calls"].append({**CALL, "id": "call_2"}),
        "messages[2]: 2 calls in one turn, but the row sets parallel_tool_calls: false",
    ),
    (
        lambda row: row["tools"][0]["function"].__setitem__("parameters", {"type": "objekt"}),
        "tools[0] (get_weather): parameters: not a valid JSON Schema",
    ),
    (
        lambda row: row.pop("tools"),
        "messages[2].tool_calls[0]: calls 'get_weather', which the row's tools do not declare (declared: none)",
    ),
    (lambda row: row["messages"][1].__setitem__("tool_calls", [CALL]), "messages[1] (user): 'tool_calls' is only"),
]


def test_every_problem_of_a_tool_row_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "tools.jsonl"
    rows = [ROW] + [broken(change) for change, _ in PROBLEMS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = run_cli("data", "validate", str(path))
    assert code == 1 and "Traceback" not in out + err
    for line, (_, said) in enumerate(PROBLEMS, start=2):
        assert f"error: {path}:{line}: {said}" in out, (line, out)
    assert f"{path}:1:" not in out  # the good row passes


def test_a_row_reads_into_calls_with_arguments_as_a_mapping():
    [chat], problems = load_records_of([ROW])
    assert not problems
    call = chat.messages[2]["tool_calls"][0]
    assert call == {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}  # fmt: skip
    assert chat.messages[2]["content"] == "" and chat.messages[3]["tool_call_id"] == "call_1"
    assert chat.tools == [WEATHER]


def load_records_of(rows: list[dict]):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return load_records(path)


def test_llama_factory_and_axolotl_layouts_read_as_the_openai_row():
    """LLaMA-Factory: ShareGPT with function_call / observation turns, `system` and `tools` as JSON text;
    Axolotl (and transformers): messages whose calls carry their arguments as a mapping, no ids."""
    llama_factory = {
        "conversations": [
            {"from": "human", "value": "How warm is it in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}),
            },  # fmt: skip
            {"from": "observation", "value": '{"temperature": 21}'},
            {"from": "gpt", "value": "It is 21 degrees in Paris."},
        ],
        "system": "You answer about the weather.",
        "tools": json.dumps([WEATHER["function"]]),
    }
    axolotl = {
        "tools": [WEATHER],
        "messages": [
            *ROW["messages"][:2],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                    }
                ],
            },  # fmt: skip
            {"role": "tool", "content": '{"temperature": 21}'},
            ROW["messages"][4],
        ],
    }
    [openai], _ = load_records_of([ROW])
    for row in (llama_factory, axolotl):
        [chat], problems = load_records_of([row])
        assert not problems
        assert chat.tools == openai.tools
        for ours, theirs in zip(chat.messages, openai.messages):
            calls = [c["function"] for c in ours.get("tool_calls", [])]
            assert (ours["role"], ours["content"], calls) == (
                theirs["role"],
                theirs["content"],
                [c["function"] for c in theirs.get("tool_calls", [])],
            )
        assert chat.messages[3]["tool_call_id"] == chat.messages[2]["tool_calls"][0]["id"]  # answered in order


def test_the_loss_sees_the_calls_and_the_answer_only():
    [chat], _ = load_records_of([ROW])
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()  # the real one: takes tools
    [example] = Renderer(tokenizer).chats([chat])
    text = tokenizer.decode(example.input_ids)
    trained = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])
    assert '"name": "get_weather"' in text.split("<|im_start|>assistant")[0]  # the tools are shown
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
        "<|im_end|>It is 21 degrees in Paris.<|im_end|>"
    )
    # the prompt of each trained turn is what inference renders with the same tools
    prompt = Renderer(tokenizer).generation_prompt_ids(chat.messages[:2], chat.tools)
    assert example.input_ids[: len(prompt)] == prompt


def test_a_template_without_tools_is_refused_and_the_built_in_one_writes_hermes_calls():
    [chat], _ = load_records_of([ROW])
    tokenizer = chat_tokenizer()  # ChatML without tools
    with pytest.raises(UserError, match="this chat template takes none .* set data.template: hermes"):
        Renderer(tokenizer).chats([chat])
    [example] = Renderer(tokenizer, template="hermes").chats([chat])
    text = tokenizer.decode(example.input_ids)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    from tunelab.infer.tool_calls import Hermes  # what `tunelab serve` reads calls back with

    content, [call] = Hermes().parse(answer)
    assert content is None
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "unit": "celsius"})


def test_convert_writes_openai_rows_and_llama_factory_sharegpt_that_read_back(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(ROW) + "\n")
    [original], _ = load_records(source)
    for to in ("messages", "sharegpt"):
        out = tmp_path / f"{to}.jsonl"
        code, _, err = run_cli("data", "convert", str(source), str(out), "--to", to)
        assert code == 0, err
        [again], problems = load_records(out)
        assert not problems and again.tools == original.tools
        assert [(m["role"], m["content"]) for m in again.messages] == [
            (m["role"], m["content"]) for m in original.messages
        ]
        assert again.messages[2]["tool_calls"][0]["function"] == original.messages[2]["tool_calls"][0]["function"]
    row = json.loads((tmp_path / "messages.jsonl").read_text())
    assert row["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris", "unit": "celsius"}'
    code, _, err = run_cli("data", "convert", str(source), str(tmp_path / "alpaca.jsonl"), "--to", "alpaca")
    assert "alpaca cannot hold tools and tool calls; use messages" in err


def test_an_sft_run_on_tool_rows_keeps_the_tool_template_for_serving(tmp_path, tunelab_home):
    """data.template: hermes on a ChatML model: it trains, and final/ carries the template, so that the
    run served by `tunelab serve` shows the tools and its calls are read back as OpenAI's tool_calls."""
    from tiny_models import tiny_llama_dir

    from tunelab.infer.tool_calls import FORMATS

    tiny_llama_dir(tmp_path / "model")
    rows = [ROW, broken(lambda row: row["messages"][2]["tool_calls"][0]["function"].update(arguments='{"city": "Rome", "unit": "celsius"}'))]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    (tmp_path / "run.yaml").write_text(
        f"method: sft\nmodel: {tmp_path / 'model'}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, template: hermes, max_length: 1024}}\n"
        "train: {max_steps: 2, batch_size: 2, precision: fp32}\n"
    )
    code, _, err = run_cli("train", str(tmp_path / "run.yaml"))
    assert code == 0, err
    template = (tmp_path / "run" / "final" / "chat_template.jinja").read_text()
    assert "tools" in template and [f.name for f in FORMATS if f.takes(template)] == ["hermes"]


def test_tool_call_scores_count_what_each_answer_got_right():
    """Six turns, each answer wrong (or right) in one way, scored as `tunelab eval` scores them."""
    from tunelab.eval.tool_calls import Turn, score
    from tunelab.infer.tool_calls import Hermes

    paris = ("get_weather", {"city": "Paris", "unit": "celsius"})
    calling = Turn("f:1", [], [WEATHER], [paris], "")
    answering = Turn("f:2", [], [WEATHER], [], "It is 21 degrees.")

    def hermes(name: str, arguments: str) -> str:
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'

    cases = [
        (calling, hermes("get_weather", '{"unit": "celsius", "city": "Paris"}')),  # right (key order aside)
        (calling, hermes("get_weather", '{"city": "Rome", "unit": "celsius"}')),  # right function, wrong arguments
        (calling, hermes("get_time", '{"city": "Paris"}')),  # a tool the row does not declare: malformed too
        (calling, "<tool_call>\n{not json\n</tool_call>"),  # begun, unreadable: malformed, and no call
        (calling, "It is sunny."),  # missed
        (answering, hermes("get_weather", '{"city": "Paris", "unit": "celsius"}')),  # called when none was due
        (answering, "It is 21 degrees."),
    ]
    metrics, rows = score([turn for turn, _ in cases], [answer for _, answer in cases], Hermes())
    assert metrics == {
        "turns": 7,
        "call_turns": 5,
        "function_accuracy": 40.0,  # 2 of 5
        "arguments_exact_match": 50.0,  # 1 of those 2
        "full_call_exact_match": 20.0,  # 1 of 5
        "full_call_exact_match_interval": [0.0, 60.0],  # 5 turns: the bootstrap's 95% interval is wide
        "missed_call_rate": 40.0,  # the unreadable one and the text
        "false_call_rate": 50.0,
        "malformed_rate": round(100 * 2 / 7, 2),
    }
    assert rows[1]["calls"] == [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]
    assert rows[1]["reference"]["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]


def test_eval_scores_a_run_on_tool_rows_with_predictions_beside_references(tmp_path, tunelab_home):
    test_an_sft_run_on_tool_rows_keeps_the_tool_template_for_serving(tmp_path, tunelab_home)
    (tmp_path / "held.jsonl").write_text(json.dumps(ROW) + "\n")
    code, out, err = run_cli("eval", str(tmp_path / "run"), "--data", str(tmp_path / "held.jsonl"))
    assert code == 0, err
    assert "2 turns (1 with calls): function_accuracy" in out
    result = json.loads((tmp_path / "run" / "eval" / "held.json").read_text())
    assert result["method"] == "tools" and result["template"] == "the model's own"
    assert set(result["metrics"]) >= {"function_accuracy", "full_call_exact_match", "malformed_rate", "false_call_rate"}
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "eval" / "held.predictions.jsonl").read_text().splitlines()
    ]
    assert [r["reference"] for r in rows] == [
        {"calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}], "text": ""},
        {"text": "It is 21 degrees in Paris."},
    ]
    assert all(isinstance(r["prediction"], str) for r in rows)


WEATHER_RESPONSE = {"role": "assistant", "content": "It is 21 degrees in Paris."}
DPO_ROW = {  # OpenAI's preference row: the preferred output calls the tool, the other guesses
    "input": {"messages": ROW["messages"][:2], "tools": [WEATHER], "parallel_tool_calls": False},
    "preferred_output": [{"role": "assistant", "tool_calls": [CALL]}],
    "non_preferred_output": [{"role": "assistant", "content": "Probably warm."}],
}


def test_preference_rows_with_tools_read_check_render_convert_and_train(tmp_path, tunelab_home):
    """OpenAI's DPO rows with `input.tools`: either output may call; the calls are checked like a chat's,
    rendered with the tools through the template, written back by `data convert`, and a dpo run trains."""
    from tiny_models import tiny_llama_dir

    after_result = {  # the prompt ends on the tool's answer: the pair is about the answer after it
        "input": {"messages": ROW["messages"][:4], "tools": [WEATHER]},
        "preferred_output": [WEATHER_RESPONSE],
        "non_preferred_output": [{"role": "assistant", "tool_calls": [{**CALL, "id": "call_2"}]}],
    }
    bad = copy.deepcopy(DPO_ROW)
    bad["preferred_output"][0]["tool_calls"][0]["function"]["arguments"] = '{"city": "Oslo", "unit": "celsius"}'
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (DPO_ROW, after_result, bad)))
    code, out, _ = run_cli("data", "validate", str(path))
    assert code == 1
    assert f"error: {path}:3: preferred_output[0].tool_calls[0]: arguments do not match get_weather's" in out
    assert f"{path}:1:" not in out and f"{path}:2:" not in out

    path.write_text("".join(json.dumps(row) + "\n" for row in (DPO_ROW, after_result) * 4))
    [first, second, *_], problems = load_records(path)
    assert (
        not problems
        and first.tools == [WEATHER]
        and first.chosen_calls[0]["function"]["arguments"]
        == {
            "city": "Paris",
            "unit": "celsius",
        }
    )
    assert second.prompt[-1]["role"] == "tool" and second.rejected_calls and not second.chosen_calls
    [(chosen, rejected)] = Renderer(chat_tokenizer(), template="hermes").preferences([first])
    tokenizer = chat_tokenizer()
    trained = tokenizer.decode([i for i, label in zip(chosen.input_ids, chosen.labels) if label != IGNORE])
    assert trained == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>'  # fmt: skip
    assert "<tools>" in tokenizer.decode(rejected.input_ids)

    out = tmp_path / "again.jsonl"
    assert run_cli("data", "convert", str(path), str(out), "--to", "openai_dpo")[0] == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["input"]["tools"] == [WEATHER]
    assert row["preferred_output"][0]["tool_calls"][0]["function"]["arguments"] == CALL["function"]["arguments"]
    code, _, err = run_cli("data", "convert", str(path), str(tmp_path / "p.jsonl"), "--to", "preference")
    assert code == 1 and "cannot hold tools and tool calls; use openai_dpo" in err

    tiny_llama_dir(tmp_path / "model")
    (tmp_path / "run.yaml").write_text(
        f"method: dpo\nmodel: {tmp_path / 'model'}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {path}, template: hermes, max_length: 1024}}\n"
        "train: {max_steps: 2, batch_size: 2, precision: fp32}\n"
    )
    code, _, err = run_cli("train", str(tmp_path / "run.yaml"))
    assert code == 0, err
    assert "tools" in (tmp_path / "run" / "final" / "chat_template.jinja").read_text()


def test_compare_takes_a_tool_use_task_and_scores_its_arms_by_full_call_exact_match(tmp_path, tunelab_home):
    """A tool-use task in `tunelab compare`: the task arm trains on tool rows (method sft, the Hermes
    template), every arm is scored in-task by full-call exact match, with paired intervals over the call
    turns. (A tiny model learns no calls in seconds: the before/after of a real one is the benchmark
    benchmarks/tool_use.py; here the scores and their pairing are checked against the predictions.)"""
    from conftest import DATA
    from tiny_models import tiny_llama_dir

    tiny_llama_dir(tmp_path / "base", positions=2048)
    rome = broken(lambda row: row["messages"][2]["tool_calls"][0]["function"].update(arguments='{"city": "Rome", "unit": "celsius"}'))  # fmt: skip
    rome["messages"][1]["content"] = "How warm is it in Rome?"
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [ROW, rome] * 4))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [ROW, rome]))
    (tmp_path / "alpaca.json").write_text(
        json.dumps([{"instruction": "Say hello.", "input": "", "output": "hello"}] * 8)
    )
    config = tmp_path / "experiment.yaml"
    config.write_text(f"""model: {tmp_path / "base"}
output_dir: {tmp_path / "out"}
task:
  method: sft
  data: {{train: {tmp_path / "tools.jsonl"}, template: hermes, max_length: 1024}}
  train: {{max_steps: 1, batch_size: 4}}
instruct:
  method: sft
  data: {{train: {tmp_path / "alpaca.json"}, max_length: 64}}
  train: {{max_steps: 1, batch_size: 4}}
test: {{data: {tmp_path / "test.jsonl"}, metric: full_call_exact_match}}
suites:
  - {{path: {DATA / "eval" / "super-natural-instructions" / "tasks"}, max_instances: 1}}
max_new_tokens: 4
""")
    code, _, err = run_cli("compare", str(config))
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    score, right = {}, {}
    for arm in ("base", "task", "instruct"):
        evaluation = results["arms"][arm]["in_task"]
        score[arm] = evaluation["metrics"]["full_call_exact_match"]
        lines = Path(evaluation["file"]).with_suffix(".predictions.jsonl").read_text().splitlines()
        right[arm] = [json.loads(line)["full_call"] for line in lines if "calls" in json.loads(line)["reference"]]
        assert evaluation["examples"] == 4 and len(right[arm]) == 2
        assert score[arm] == 100 * sum(right[arm]) / 2
    pairs = {(d["a"], d["b"]): d for d in results["differences"]["in-task"]}
    assert set(pairs) == {("instruct", "base"), ("task", "base"), ("task", "instruct")}
    for (a, b), d in pairs.items():
        assert d["metric"] == "full_call_exact_match" and d["instances"] == 2
        assert d["difference"] == pytest.approx(score[a] - score[b]) and d["low"] <= d["difference"] <= d["high"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**In-task**: full_call_exact_match on test.jsonl (4 turns)" in report

    config.write_text(config.read_text().replace("method: sft\n  data: {train: " + str(tmp_path / "tools"), "method: task\n  data: {train: " + str(tmp_path / "tools")))  # fmt: skip
    code, _, err = run_cli("compare", str(config))
    assert code == 1 and "task.method: the task arm is a method: sft run, not task" in err


def test_a_job_on_tool_rows_trains_with_hermes_unless_the_model_template_takes_tools(tmp_path):
    """OpenAI's API has no template to choose: supervised and DPO files with tools on a model whose own
    template takes none get `data.template: hermes`; on one whose template takes tools, its own."""
    from tiny_models import tiny_llama_dir

    from tunelab.jobs.config import tool_template

    chatml = tiny_llama_dir(tmp_path / "chatml")
    qwen = tiny_llama_dir(tmp_path / "qwen", template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    for name, row in (("sft", ROW), ("dpo", DPO_ROW)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert tool_template(path, str(chatml)) == {"template": "hermes"}, name
        assert tool_template(path, str(qwen)) == {}, name
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": ROW["messages"][:2] + [WEATHER_RESPONSE]}) + "\n")
    assert tool_template(plain, str(chatml)) == {}
