"""OpenAI's graders on `tunelab serve`, driven by the official `openai` client (fine_tuning.alpha.graders.run
and .validate) against a live server: string checks, text similarity (the same numbers sacrebleu and
rouge-score give), multi graders' formulas, python graders refused unless the operator allows them, and
then confined (no network, a time limit)."""

from __future__ import annotations

import socket

import pytest
from helpers import live

openai = pytest.importorskip("openai")


def server(tmp_path, allow_python: bool):
    from tunelab.jobs.service import Jobs
    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    jobs = Jobs(tmp_path / f"data-{allow_python}", allow_python_graders=allow_python)
    return live(create_app(ModelStore([]), jobs=jobs))


def client(url: str):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


RIGHT = {"type": "string_check", "name": "right", "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}"}


def test_string_checks_and_their_templates(tmp_path):
    with server(tmp_path, False) as url:
        graders = client(url).fine_tuning.alpha.graders
        for operation, sample, reward in (
            ("eq", "42", 1.0),
            ("eq", "42.", 0.0),
            ("ne", "41", 1.0),
            ("like", "The answer is 42.", 1.0),
            ("like", "The answer is 4 2.", 0.0),
            ("ilike", "ANSWER: 42", 1.0),
        ):
            result = graders.run(grader={**RIGHT, "operation": operation}, model_sample=sample, item={"answer": "42"})
            assert result.reward == reward, (operation, sample)
            assert result.metadata.name == "right" and result.metadata.type == "string_check"
            assert not result.metadata.errors.invalid_variable_error
        json_grader = {**RIGHT, "operation": "eq", "input": "{{ sample.output_json.city }}", "reference": "Paris"}
        assert graders.run(grader=json_grader, model_sample='{"city": "Paris"}').reward == 1.0
        missing = graders.run(grader={**RIGHT, "operation": "eq"}, model_sample="42", item={"solution": "42"})
        assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error  # the item has no answer
        assert graders.validate(grader={**RIGHT, "operation": "eq"}).grader.name == "right"


def test_text_similarity_is_sacrebleus_and_rouge_scores(tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    sample, reference = "the cat sat on the mat today", "the cat sat on a mat"
    with server(tmp_path, False) as url:
        graders = client(url).fine_tuning.alpha.graders

        def score(metric: str) -> float:
            grader = {
                "type": "text_similarity",
                "name": metric,
                "input": "{{ sample.output_text }}",
                "reference": "{{ item.reference }}",
                "evaluation_metric": metric,
            }
            return graders.run(grader=grader, model_sample=sample, item={"reference": reference}).reward

        assert score("bleu") == pytest.approx(sacrebleu.sentence_bleu(sample, [reference]).score / 100)
        rouge = rouge_scorer.RougeScorer(["rougeL", "rouge2"], use_stemmer=True).score(reference, sample)
        assert score("rouge_l") == pytest.approx(rouge["rougeL"].fmeasure)
        assert score("rouge_2") == pytest.approx(rouge["rouge2"].fmeasure)
        assert 0.5 < score("fuzzy_match") < 1.0 and 0 < score("gleu") < 1
        with pytest.raises(openai.BadRequestError) as refused:
            graders.validate(
                grader={
                    "type": "text_similarity",
                    "name": "m",
                    "input": "x",
                    "reference": "y",
                    "evaluation_metric": "meteor",
                }
            )
        assert "meteor" in refused.value.message and refused.value.body["param"] == "grader.evaluation_metric"


def test_a_multi_graders_formula_combines_its_graders(tmp_path):
    multi = {
        "type": "multi",
        "name": "combined",
        "graders": {
            "exact": {**RIGHT, "name": "exact", "operation": "eq"},
            "mentions": {**RIGHT, "name": "mentions", "operation": "like"},
        },
        "calculate_output": "0.75 * exact + 0.25 * max(mentions, 0)",
    }
    with server(tmp_path, False) as url:
        graders = client(url).fine_tuning.alpha.graders
        result = graders.run(grader=multi, model_sample="It is 42", item={"answer": "42"})
        assert result.reward == pytest.approx(0.25) and result.sub_rewards == {"exact": 0.0, "mentions": 1.0}
        assert graders.run(grader=multi, model_sample="42", item={"answer": "42"}).reward == pytest.approx(1.0)
        for formula, says in (
            ("exact + unknown", "'unknown' is not one of the graders"),
            ("__import__('os').getcwd()", "only numbers, the graders' names"),
            ("exact.real", "only numbers, the graders' names"),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                graders.validate(grader={**multi, "calculate_output": formula})
            assert says in refused.value.message


PYTHON = """
import socket

def grade(sample, item):
    if item.get("reach"):  # whether this process can reach the server that runs it
        try:
            socket.create_connection(("127.0.0.1", item["reach"]), timeout=2).close()
            return 1.0
        except OSError:
            return 0.0
    if item.get("spin"):
        while True:
            pass
    return float(sample["output_text"].strip() == item["answer"])
"""


def test_python_graders_are_refused_unless_allowed_then_run_confined(tmp_path):
    grader = {"type": "python", "name": "checker", "source": PYTHON}
    with server(tmp_path, False) as url:
        for call in (
            lambda g: g.validate(grader=grader),
            lambda g: g.run(grader=grader, model_sample="42", item={"answer": "42"}),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                call(client(url).fine_tuning.alpha.graders)
            assert (
                refused.value.code == "python_grader_not_allowed" and "--allow-python-graders" in refused.value.message
            )
    with server(tmp_path, True) as url:
        graders = client(url).fine_tuning.alpha.graders
        assert graders.run(grader=grader, model_sample="42", item={"answer": "42"}).reward == 1.0
        assert graders.run(grader=grader, model_sample="41", item={"answer": "42"}).reward == 0.0
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # this process reaches the server
        assert graders.run(grader=grader, model_sample="", item={"reach": port}).reward == 0.0  # the grader cannot
        spun = graders.run(grader=grader, model_sample="", item={"spin": True})
        assert spun.reward == 0.0 and spun.metadata.errors.python_grader_runtime_error
        broken = graders.run(grader=grader, model_sample="", item={})  # KeyError: 'answer'
        assert broken.metadata.errors.python_grader_runtime_error
        assert "KeyError" in broken.metadata.errors.python_grader_runtime_error_details
        with pytest.raises(openai.BadRequestError) as refused:
            graders.validate(grader={**grader, "source": "def check(sample, item):\n    return 1"})
        assert "defines no function grade(sample, item)" in refused.value.message
