"""lm-evaluation-harness against `tunelab serve`, as a user runs it: `local-completions` at its defaults
(prompts sent as token ids, log-likelihoods read from `echo` + `logprobs`), on a multiple-choice task
(SST-2 sentences from ../shared/data) and a generation task (DialogSum dialogues), against lm-eval's own
`hf` backend on the same model in fp32: the same accuracy, every choice's log-likelihood to 1e-3, the
same generations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import live
from tiny_models import tiny_llama_dir

from tunelab.serve.app import create_app
from tunelab.serve.store import ModelStore

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOCS = 24

MULTIPLE_CHOICE = """\
task: sst2_tunelab
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
"""

GENERATION = """\
task: dialogsum_tunelab
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: generate_until
doc_to_text: "Dialogue: {{{{dialogue}}}}\\nSummary:"
doc_to_target: "{{{{summary}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """The two tasks' YAML and their documents (the first DOCS rows of each file) in a folder for lm-eval."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    with open(DATA / "classify" / "sst2" / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:DOCS]
    sst2 = [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows]
    dialogs = [json.loads(line) for line in (DATA / "summarize" / "dialogsum.dev.jsonl").open()][:8]
    for name, docs, template in (("sst2", sst2, MULTIPLE_CHOICE), ("dialogsum", dialogs, GENERATION)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(template.format(data=folder / f"{name}.jsonl"))
    return folder


def evaluate(model: str, model_args: dict, tasks: Path, batch_size: int = 1) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["sst2_tunelab", "dialogsum_tunelab"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        log_samples=True,
        random_seed=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2-135m-instruct", marks=pytest.mark.real)])
def test_lm_eval_scores_the_server_as_its_own_hf_backend_does(model, tmp_path, tasks, monkeypatch):
    from tunelab.models import pull

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    folder = tiny_llama_dir(tmp_path / "llama", positions=1024) if model == "tiny" else pull(model)
    reference = evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu"}, tasks)
    store = ModelStore([str(folder)], tmp_path / "runs")
    (served_id,) = store.served()
    with live(create_app(store)) as url:
        served = evaluate(
            "local-completions",
            {"model": served_id, "base_url": f"{url}/completions", "tokenizer": str(folder)},
            tasks,
        )
    ours, theirs = served["samples"]["sst2_tunelab"], reference["samples"]["sst2_tunelab"]
    assert len(ours) == len(theirs) == DOCS
    for a, b in zip(sorted(ours, key=lambda s: s["doc_id"]), sorted(theirs, key=lambda s: s["doc_id"])):
        (mine, greedy_mine), (hf, greedy_hf) = zip(*[r[0] for r in a["resps"]]), zip(*[r[0] for r in b["resps"]])
        assert mine == pytest.approx(hf, abs=1e-3), a["doc_id"]
        assert greedy_mine == greedy_hf
    assert served["results"]["sst2_tunelab"]["acc,none"] == reference["results"]["sst2_tunelab"]["acc,none"]
    made = {s["doc_id"]: s["resps"][0][0] for s in served["samples"]["dialogsum_tunelab"]}
    expected = {s["doc_id"]: s["resps"][0][0] for s in reference["samples"]["dialogsum_tunelab"]}
    assert made == expected and len(made) == 8
