"""OpenAI's graders: a completion scored against a dataset item, as reinforcement fine-tuning and
`POST /v1/fine_tuning/alpha/graders/run` score it.

    grader = check({"type": "string_check", "name": "right", "input": "{{ sample.output_text }}",
                    "reference": "{{ item.answer }}", "operation": "eq"})
    grade(grader, "42", {"answer": "42"}).reward            # 1.0

    string_check     eq, ne (exact), like (the reference is in the input), ilike (the same, ignoring case): 1 or 0
    text_similarity  fuzzy_match (difflib's ratio of the normalised texts: OpenAI does not say its algorithm),
                     bleu (sacrebleu's sentence BLEU / 100), gleu (nltk's sentence GLEU), rouge_1 ... rouge_5,
                     rouge_l (rouge-score's F1, stemmed); 0 to 1. meteor and cosine are refused (they need
                     WordNet data and an embedding model this machine does not have)
    python           the source's `grade(sample, item) -> float`, run in a process of its own with a time and
                     memory limit and no network, only when the operator allows it (`allow_python`)
    multi            `calculate_output`, an arithmetic formula over its graders' names (+ - * / **, numbers,
                     min max abs sqrt log exp floor ceil)

Templates are `{{ sample.output_text }}`, `{{ sample.output_json.KEY }}` and `{{ item.FIELD }}` (Jinja's
sandbox, a name that is not there an error); `sample.output_json` is the completion parsed as JSON, when
it is JSON. Model graders (score_model, label_model) need a judge model: refused.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import RequestError

SIMILARITY = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
OPERATIONS = ("eq", "ne", "like", "ilike")
FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
}
ERROR_FLAGS = (  # the errors OpenAI's graders/run reports, each true or false
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
PYTHON_SECONDS, PYTHON_MEMORY = 10.0, 512 << 20  # a python grader's limits, each time it runs


@dataclass
class Graded:
    """What grading one sample gives, as OpenAI's graders/run answers it."""

    reward: float
    sub_rewards: dict[str, float] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)  # OpenAI's error flags that are set, with details
    seconds: float = 0.0

    def answer(self, grader: dict) -> dict:
        """POST /v1/fine_tuning/alpha/graders/run's answer: the reward, each sub-grader's, what went wrong."""
        errors: dict[str, Any] = {flag: bool(self.errors.get(flag)) for flag in ERROR_FLAGS}
        errors["model_grader_server_error_details"] = None
        errors["python_grader_runtime_error_details"] = self.errors.get("python_grader_runtime_error_details")
        errors["python_grader_server_error_type"] = self.errors.get("python_grader_server_error_details")
        errors.update({k: v for k, v in self.errors.items() if k.endswith("_details") and k not in errors})
        return {
            "reward": self.reward,
            "metadata": {
                "name": grader["name"],
                "type": grader["type"],
                "errors": errors,
                "execution_time": self.seconds,
                "scores": self.sub_rewards or {grader["name"]: self.reward},
                "token_usage": None,
                "sampled_model_name": None,
            },
            "sub_rewards": self.sub_rewards,
            "model_grader_token_usage_per_model": {},
        }


class GraderError(Exception):
    """A grader that could not grade this sample (a template naming what the item lacks, a python grader
    that raised): the sample's reward is 0, and the flag says why."""

    def __init__(self, flag: str, details: str):
        super().__init__(details)
        self.flag, self.details = flag, details


def check(grader: Any, allow_python: bool = False, where: str = "grader") -> dict:
    """`grader` checked (400 naming the field) and returned as a plain dict."""
    if not isinstance(grader, dict):
        raise RequestError(400, f"{where}: expected a grader object", param=where)
    kind = grader.get("type")
    need = {
        "string_check": ("name", "input", "reference", "operation"),
        "text_similarity": ("name", "input", "reference", "evaluation_metric"),
        "python": ("name", "source"),
        "multi": ("name", "graders", "calculate_output"),
    }
    if kind in ("score_model", "label_model"):
        raise RequestError(400, f"{where}.type: {kind} graders need a judge model; this server has none", param=where)
    if kind not in need:
        raise RequestError(400, f"{where}.type: expected one of {', '.join(need)}, got {kind!r}", param=f"{where}.type")
    for key in need[kind]:
        if key not in grader:
            raise RequestError(400, f"{where}.{key}: required for a {kind} grader", param=f"{where}.{key}")
    for key in ("name", "input", "reference", "source", "calculate_output"):
        if key in grader and not isinstance(grader[key], str):
            raise RequestError(400, f"{where}.{key}: expected a string", param=f"{where}.{key}")
    if kind == "string_check" and grader["operation"] not in OPERATIONS:
        raise RequestError(
            400, f"{where}.operation: expected one of {', '.join(OPERATIONS)}", param=f"{where}.operation"
        )
    if kind == "text_similarity":
        metric = grader["evaluation_metric"]
        if metric not in SIMILARITY:
            why = (
                " (it needs WordNet data or an embedding model this server does not have)"
                if metric
                in (
                    "meteor",
                    "cosine",
                )
                else ""
            )
            raise RequestError(
                400,
                f"{where}.evaluation_metric: {metric!r} is not available here{why}; expected one of "
                + ", ".join(SIMILARITY),
                param=f"{where}.evaluation_metric",
            )
        threshold = grader.get("pass_threshold")
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise RequestError(400, f"{where}.pass_threshold: expected a number", param=f"{where}.pass_threshold")
    for key in ("input", "reference"):
        if key in grader:
            _template(grader[key], f"{where}.{key}")
    if kind == "python":
        if not allow_python:
            raise RequestError(
                400,
                f"{where}: python graders run code the request sends, which this server does not allow; its "
                "operator may (tunelab serve --allow-python-graders)",
                param=f"{where}.type",
                code="python_grader_not_allowed",
            )
        try:
            tree = ast.parse(grader["source"])
        except SyntaxError as e:
            raise RequestError(400, f"{where}.source: line {e.lineno}: {e.msg}", param=f"{where}.source") from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise RequestError(400, f"{where}.source: defines no function grade(sample, item)", param=f"{where}.source")
    if kind == "multi":
        graders = grader["graders"]
        if isinstance(graders, dict) and graders.get("type") is not None:
            graders = {graders.get("name", "grader"): graders}  # one grader, as the SDK's type has it
        if not isinstance(graders, dict) or not graders:
            raise RequestError(400, f"{where}.graders: expected {{name: grader, ...}}", param=f"{where}.graders")
        checked = {name: check(g, allow_python, f"{where}.graders.{name}") for name, g in graders.items()}
        _formula(grader["calculate_output"], set(checked), f"{where}.calculate_output")
        return {**grader, "graders": checked}
    return dict(grader)


def grade(grader: dict, output: str, item: dict) -> Graded:
    """Score `output` (the completion) against `item` with a checked grader. A grader that cannot grade this
    sample gives 0 with the error flag OpenAI sets for it."""
    started = time.perf_counter()
    try:
        reward, subs = _score(grader, output, item)
        return Graded(reward, subs, seconds=time.perf_counter() - started)
    except GraderError as e:
        return Graded(0.0, errors={e.flag: True, f"{e.flag}_details": e.details}, seconds=time.perf_counter() - started)


def _score(grader: dict, output: str, item: dict) -> tuple[float, dict[str, float]]:
    kind = grader["type"]
    if kind == "multi":
        subs = {name: _score(g, output, item)[0] for name, g in grader["graders"].items()}
        try:
            value = _evaluate(ast.parse(grader["calculate_output"], mode="eval").body, subs)
        except (ArithmeticError, ValueError) as e:
            raise GraderError("formula_parse_error", f"calculate_output: {e}") from None
        return float(value), subs
    if kind == "python":
        return _python(grader["source"], output, item), {}
    given = _render(grader["input"], output, item)
    reference = _render(grader["reference"], output, item)
    if kind == "string_check":
        operation = grader["operation"]
        same = {
            "eq": given == reference,
            "ne": given != reference,
            "like": reference in given,
            "ilike": reference.lower() in given.lower(),
        }[operation]
        return float(same), {}
    return similarity(grader["evaluation_metric"], given, reference), {}


def similarity(metric: str, text: str, reference: str) -> float:
    """text_similarity's score, 0 to 1."""
    if metric == "fuzzy_match":
        from difflib import SequenceMatcher

        from tunelab.eval.metrics import normalize

        return SequenceMatcher(None, normalize(text), normalize(reference)).ratio()
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    from rouge_score import rouge_scorer

    key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
    return float(rouge_scorer.RougeScorer([key], use_stemmer=True).score(reference, text)[key].fmeasure)


# --- templates -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compiled(text: str):
    """A template compiled once (a reinforcement job renders the same few for every completion), in Jinja's
    sandbox, where a name that is not there is an error."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False).from_string(text)


def _template(text: str, where: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _compiled(text)
    except TemplateSyntaxError as e:
        raise RequestError(400, f"{where}: the template does not parse: {e.message}", param=where) from None


def _render(text: str, output: str, item: dict) -> str:
    from jinja2 import TemplateError

    try:
        return _compiled(text).render(sample=_sample(output), item=item)
    except TemplateError as e:
        raise GraderError("invalid_variable_error", f"{text}: {e}") from None


def _sample(output: str) -> dict:
    """The `sample` namespace: the completion's text, and its JSON when it is JSON (else None)."""
    try:
        parsed = json.loads(output)
    except ValueError:
        parsed = None
    return {"output_text": output, "output_json": parsed}


# --- calculate_output: arithmetic over the graders' names, nothing else ---------------------------------
# Written here: Python's own eval would run anything; this walks the formula's syntax tree and allows only
# numbers, the graders' names, + - * / ** and the functions of FUNCTIONS.

_OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def _formula(text: str, names: set[str], where: str) -> None:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise RequestError(400, f"{where}: does not parse: {e.msg}", param=where) from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in FUNCTIONS:
            raise RequestError(
                400, f"{where}: {node.id!r} is not one of the graders ({', '.join(sorted(names))})", param=where
            )
        allowed = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Load, ast.USub, ast.UAdd)
        if not isinstance(node, allowed + tuple(_OPERATORS)) or (
            isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS)
        ):
            raise RequestError(
                400,
                f"{where}: only numbers, the graders' names, + - * / ** and {', '.join(FUNCTIONS)} are allowed",
                param=where,
            )


def _evaluate(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return float(FUNCTIONS[node.func.id](*(_evaluate(a, values) for a in node.args)))
    raise ValueError("not an arithmetic formula")


# --- python graders: the source in a process of its own ------------------------------------------------

_RUNNER = """
import ctypes, json, os, resource, sys
seconds, memory = float(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (int(seconds), int(seconds)))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
if libc.unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWNET | CLONE_NEWUSER) != 0:
    sys.exit(3)  # no network namespace: the grader does not run at all
source, sample, item = json.loads(sys.stdin.read())
namespace = {}
exec(compile(source, "grader.py", "exec"), namespace)
print(json.dumps(float(namespace["grade"](sample, item))))
"""
NO_NAMESPACE = 3


def _python(source: str, output: str, item: dict) -> float:
    """The source's grade(sample, item) in a fresh interpreter (-I: no site or user paths, an empty
    environment) that first confines itself: at most PYTHON_SECONDS of CPU (and of wall time, from here),
    PYTHON_MEMORY of address space, and no network (a network namespace of its own, unshare(2): no
    interface but a loopback that is down). Its failure is the sample's error, not the server's."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _RUNNER, str(PYTHON_SECONDS), str(PYTHON_MEMORY)],
            input=json.dumps([source, _sample(output), item]),
            capture_output=True,
            text=True,
            timeout=PYTHON_SECONDS,
            env={"PATH": "/usr/bin:/bin"},
        )
    except subprocess.TimeoutExpired:
        raise GraderError("python_grader_runtime_error", f"grade() ran past {PYTHON_SECONDS:g} s") from None
    if done.returncode == NO_NAMESPACE:
        raise GraderError(
            "python_grader_server_error", "python graders run without a network, and unshare(CLONE_NEWNET) failed here"
        )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise GraderError("python_grader_runtime_error", lines[-1] if lines else f"exit status {done.returncode}")
    try:
        return float(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise GraderError("python_grader_runtime_error", "grade() must return a number") from None
