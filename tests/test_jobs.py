"""OpenAI's files and fine-tuning jobs API on `tunelab serve`, driven by the official `openai` client against a
live server (a subprocess on 127.0.0.1, a free port) that trains a tiny model in its own subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Server, children, running, wait_until, wandb_history, wandb_records
from tiny_models import tiny_llama_dir

openai = pytest.importorskip("openai")


def chats(n: int, offset: int = 0) -> str:
    """OpenAI's chat format; every third row has an earlier assistant turn of weight 0 (not trained on)."""
    rows = []
    for i in range(offset, offset + n):
        earlier = (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "weight": 0}]
            if i % 3 == 0
            else []
        )
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer with a sum."},
                    *earlier,
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"The answer is {2 * i}."},
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs")
    tiny_llama_dir(root / "llama")
    (root / "train.jsonl").write_text(chats(48))
    (root / "valid.jsonl").write_text(chats(8, offset=100))
    (root / "long.jsonl").write_text(chats(200))  # about 11 steps an epoch
    bad = chats(4).splitlines()
    bad[2] = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]})
    (root / "bad.jsonl").write_text("\n".join(bad) + "\n")
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"Say {i}."}]},
            "preferred_output": [{"role": "assistant", "content": f"{i}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"No, {i + 1}."}],
        }
        for i in range(24)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


@pytest.fixture(scope="module")
def server(workspace):
    server = Server(workspace / "llama", workspace / "data")
    yield server
    server.stop()


def upload(client, path: Path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune")


def wait(client, job_id: str, until=("succeeded", "failed", "cancelled"), seconds: float = 240):
    deadline = time.time() + seconds
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} is still {job.status} after {seconds} s")


def metrics(client, job_id: str) -> dict[int, dict]:
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))
    return {e.data["step"]: e.data for e in events if e.type == "metrics" and "train_loss" in e.data}


def test_a_job_trains_reports_and_serves_its_model(server, workspace):
    client = server.client
    train, valid = upload(client, workspace / "train.jsonl"), upload(client, workspace / "valid.jsonl")
    assert train.id.startswith("file-") and train.bytes == (workspace / "train.jsonl").stat().st_size
    assert client.files.content(train.id).read() == (workspace / "train.jsonl").read_bytes()
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=train.id,
        validation_file=valid.id,
        suffix="sums",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:llama:tunelab:sums:") and job.trained_tokens > 0
    hp = job.method.supervised.hyperparameters
    assert hp.n_epochs == 3 and hp.batch_size == 1 and hp.learning_rate_multiplier == 1.0  # "auto", resolved
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed"  # newest first
    steps = metrics(client, job.id)
    assert steps and all(d["train_loss"] > 0 and 0 <= d["train_mean_token_accuracy"] <= 1 for d in steps.values())
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    per_epoch = max(steps) // 3
    assert [c.step_number for c in checkpoints] == [3 * per_epoch, 2 * per_epoch, per_epoch]  # one an epoch
    assert checkpoints[0].metrics.valid_loss is not None
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(results) > 3
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "What is 3 plus 3?"}],
        max_tokens=4,
        temperature=0,
    )
    assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens > 0
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [job.id]
    assert client.files.delete(valid.id).deleted  # a finished job's file may go
    import httpx  # the dashboard's endpoints show the job's run, with the job's status and events

    dashboard = f"http://127.0.0.1:{server.port}/api/runs"
    row = next(r for r in httpx.get(dashboard).json()["runs"] if r["name"] == job.id)
    assert row["status"] == "succeeded" and row["method"] == "sft" and row["step"] == max(steps)
    detail = httpx.get(f"{dashboard}/{job.id}").json()
    assert detail["events"][0]["message"] == "The job has successfully completed" and detail["job"]["id"] == job.id
    # no answer names the data directory: the run's config shows the uploaded file by its id and name
    assert detail["config"]["data"]["train"] == f"{train.id} (train.jsonl)" and detail["config"]["output_dir"] == job.id
    assert detail["config"]["model"] == "llama"
    api = f"http://127.0.0.1:{server.port}"
    answers = [
        httpx.get(api + path).text
        for path in (
            "/api/runs",
            f"/api/runs/{job.id}",
            f"/api/runs/{job.id}/metrics",
            "/v1/fine_tuning/jobs",
            f"/v1/fine_tuning/jobs/{job.id}",
            f"/v1/fine_tuning/jobs/{job.id}/events?limit=100",
            f"/v1/fine_tuning/jobs/{job.id}/checkpoints",
            "/v1/files",
            f"/v1/files/{train.id}",
            "/api/models",
        )
    ]
    for folder in {str(server.data), os.path.realpath(server.data), str(workspace)}:
        assert not [a for a in answers if folder in a], folder
    deleted = client.models.delete(job.fine_tuned_model)
    assert deleted.deleted and job.fine_tuned_model not in [m.id for m in client.models.list()]


def test_an_invalid_file_fails_its_job_naming_the_line(server, workspace):
    client = server.client
    bad = upload(client, workspace / "bad.jsonl")
    job = wait(client, client.fine_tuning.jobs.create(model="llama", training_file=bad.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert f"{bad.id} (bad.jsonl): line 3:" in job.error.message and "bot" in job.error.message
    pairs = upload(client, workspace / "pairs.jsonl")  # preference pairs, for a supervised job
    job = wait(client, client.fine_tuning.jobs.create(model="llama", training_file=pairs.id).id)
    assert job.status == "failed" and "a supervised job trains on a chat" in job.error.message


def test_bad_requests_name_their_parameter(server, workspace):
    client = server.client
    train = upload(client, workspace / "train.jsonl")
    cases = [
        ({"model": "no-such-model", "training_file": train.id}, "model"),
        ({"model": "llama", "training_file": "file-nope"}, "training_file"),
        ({"model": "llama", "training_file": train.id, "suffix": "has space"}, "suffix"),
        (
            {
                "model": "llama",
                "training_file": train.id,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
            },
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {
                "model": "llama",
                "training_file": train.id,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"warmup": 3}}},
            },
            "method.supervised.hyperparameters.warmup",
        ),
        (
            {"model": "llama", "training_file": train.id, "method": {"type": "reinforcement"}},
            "method.reinforcement.grader",
        ),
        ({"model": "llama", "training_file": train.id, "integrations": [{"type": "slack"}]}, "integrations"),
        (
            {"model": "llama", "training_file": train.id, "integrations": [{"type": "wandb", "wandb": {}}]},
            "integrations",
        ),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**kwargs)
        assert e.value.body["param"] == param, (param, e.value.body)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune-results")
    assert e.value.body["param"] == "purpose"


def test_lists_page_with_has_more_and_the_clients_auto_pagination(server, workspace):
    client = server.client
    ids = [upload(client, workspace / "valid.jsonl").id for _ in range(5)]
    page = client.files.list(limit=2, purpose="fine-tune")
    assert len(page.data) == 2 and page.has_more and page.data[0].id == ids[-1]  # newest first
    every = [f.id for f in client.files.list(limit=2, purpose="fine-tune")]  # the client follows `after`
    assert every[:5] == ids[::-1] and len(every) == len(set(every))
    ascending = [f.id for f in client.files.list(limit=2, purpose="fine-tune", order="asc")]
    assert ascending == every[::-1]  # the same files, oldest first
    bad = upload(client, workspace / "bad.jsonl")  # jobs of its own (they fail validation at once: no training)
    created = [client.fine_tuning.jobs.create(model="llama", training_file=bad.id).id for _ in range(3)]
    jobs = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert [j for j in jobs if j in created] == created[::-1] and len(jobs) == len(set(jobs))
    first = client.fine_tuning.jobs.list(limit=1)
    assert first.has_more and len(first.data) == 1 and first.data[0].id == jobs[0] == created[-1]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(after="ftjob-nope")


def test_cancel_stops_training_within_seconds_and_keeps_what_it_wrote(server, workspace):
    client = server.client
    long = upload(client, workspace / "long.jsonl")
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=long.id,
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20}}},
    )
    wait(client, job.id, until=("running",))
    with pytest.raises(openai.ConflictError) as e:  # the file of a running job stays
        client.files.delete(long.id)
    assert job.id in e.value.message
    wait_until(lambda: metrics(client, job.id), what="its first metrics")
    finish = wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).estimated_finish, 30, "an estimated finish")
    assert finish > job.created_at  # the run's progress.json follows its first metrics line
    small = client.fine_tuning.jobs.create(
        model="llama",
        training_file=upload(client, workspace / "valid.jsonl").id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    assert wait(client, small.id, until=("queued",)).status == "queued"  # --max-running 1: it waits its turn
    time.sleep(1)  # a second later it still waits: there is nothing to await for what does not happen
    assert client.fine_tuning.jobs.retrieve(small.id).status == "queued"
    started = time.time()
    job = client.fine_tuning.jobs.cancel(job.id)
    assert job.status == "cancelled" and time.time() - started < 10 and job.finished_at
    run = server.data / "jobs" / job.id
    assert (run / "train.log").is_file() and (run / "run" / "metrics.jsonl").is_file()
    assert "Job cancelled" in [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(long.id).deleted
    assert wait(client, small.id).status == "succeeded"  # its turn came


def test_a_paused_job_resumes_and_finishes(server, workspace):
    client = server.client
    long = upload(client, workspace / "long.jsonl")
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=long.id,
        seed=4,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    wait(client, job.id, until=("running",))
    wait_until(lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)), what="its first checkpoint")
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    time.sleep(1)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Fine-tuning job resumed from its last checkpoint" in messages


def test_a_dpo_job(server, workspace):
    client = server.client
    pairs = upload(client, workspace / "pairs.jsonl")
    wandb = {"project": "preferences", "name": "say-numbers", "tags": ["dpo", "tiny"]}
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=pairs.id,
        seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}},
        integrations=[{"type": "wandb", "wandb": wandb}],
    )
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.integrations[0].type == "wandb" and job.integrations[0].wandb.project == "preferences"
    steps = metrics(client, job.id)
    config = (server.data / "jobs" / job.id / "config.yaml").read_text()
    assert "method: dpo" in config and "beta: 0.2" in config and "report_to:\n  - wandb" in config
    # OpenAI's W&B integration: the run logged to W&B (offline here) in the project, name and tags given
    records = wandb_records(server.data / "jobs" / job.id / "run" / "wandb")
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert (run.project, run.display_name, list(run.tags)) == ("preferences", "say-numbers", ["dpo", "tiny"])
    losses = dict(wandb_history(server.data / "jobs" / job.id / "run" / "wandb")["train/loss"])
    assert losses == pytest.approx({step: entry["train_loss"] for step, entry in steps.items()}, rel=1e-6)


def test_a_reinforcement_job_trains_against_its_string_check_grader(server, workspace, tmp_path):
    """OpenAI's reinforcement fine-tuning: rows of messages ending with the user's turn and the fields the
    grader reads; the job trains with method grpo, the grader as its reward, and reports the reward curve."""
    client = server.client
    words = ["sea", "cat", "map", "sun"]
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}], "answer": w} for w in words * 4]
    (tmp_path / "rft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rft-valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    grader = {
        "type": "string_check",
        "name": "says_it",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "ilike",
    }
    hyperparameters = {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "eval_samples": 4}
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=upload(client, tmp_path / "rft.jsonl").id,
        validation_file=upload(client, tmp_path / "rft-valid.jsonl").id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyperparameters}},
    )
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.name == "says_it"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5
    config = (server.data / "jobs" / job.id / "config.yaml").read_text()
    assert "method: grpo" in config and "format: openai_rft" in config and "num_generations: 4" in config
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    rewards = [e.data for e in events if e.type == "metrics" and "train_reward_mean" in e.data]
    assert len(rewards) == 8 and all(0 <= d["train_reward_mean"] <= 1 for d in rewards)  # 16 rows, 2 a step
    assert any(e.type == "metrics" and "valid_reward_mean" in e.data for e in events)
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0].endswith(",train_reward_mean,valid_reward_mean") and len(results) == 1 + 9  # steps 0-8
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say sea."}], max_tokens=4
    )
    assert reply.usage.completion_tokens > 0
    # a python grader's source would run on the server: refused unless its operator allowed it
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="llama",
            training_file=job.training_file,
            method={
                "type": "reinforcement",
                "reinforcement": {
                    "grader": {"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1"}
                },
            },
        )
    assert refused.value.code == "python_grader_not_allowed"
    assert refused.value.body["param"] == "method.reinforcement.grader.type"


def test_a_would_be_jobs_files_are_checked_by_file_and_line_before_anything_is_created(server, workspace):
    """GET /api/fine_tuning/check, what the dashboard's new-job page shows before it submits."""
    import httpx

    client = server.client
    check = f"http://127.0.0.1:{server.port}/api/fine_tuning/check"
    train, bad = upload(client, workspace / "train.jsonl"), upload(client, workspace / "bad.jsonl")
    pairs = upload(client, workspace / "pairs.jsonl")
    jobs = len(list(client.fine_tuning.jobs.list(limit=100)))
    clean = httpx.get(check, params={"training_file": train.id}).json()
    assert clean["ok"] and clean["errors"] == [] and clean["examples"] == {"training_file": 48}
    assert clean["auto"] == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert clean["learning_rate"] == {"lora": 2e-4, "full": 2e-5}
    answer = httpx.get(check, params={"training_file": train.id, "validation_file": bad.id})
    found = answer.json()
    assert not found["ok"] and found["error_count"] == 1 and found["examples"]["validation_file"] == 3
    [problem] = found["errors"]
    assert problem["param"] == "validation_file" and problem["line"] == 3 and "'bot'" in problem["message"]
    leaking = httpx.get(check, params={"training_file": train.id, "validation_file": train.id}).json()
    assert leaking["ok"] and leaking["warning_count"] > 0  # the same examples on both sides: worth a look
    for folder in {str(server.data), os.path.realpath(server.data)}:
        assert folder not in answer.text and folder not in json.dumps(leaking)
    wrong = httpx.get(check, params={"training_file": train.id, "method": "dpo"}).json()
    assert not wrong["ok"] and "a dpo job trains on a preference pair" in wrong["errors"][0]["message"]
    dpo = httpx.get(check, params={"training_file": pairs.id, "method": "dpo"}).json()
    assert dpo["ok"] and dpo["auto"]["beta"] == 0.1 and dpo["auto"]["n_epochs"] == 5  # 24 pairs: 100 seen at least
    for params, param in (
        ({"training_file": "file-nope"}, "training_file"),
        ({"training_file": train.id, "method": "rl"}, "method"),
    ):
        refused = httpx.get(check, params=params)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert len(list(client.fine_tuning.jobs.list(limit=100))) == jobs  # a check creates nothing


def test_a_finished_jobs_adapter_and_merged_model_download_and_load_without_tunelab(server, workspace, tmp_path):
    """The dashboard's downloads, made on the server: the adapter (peft loads it on the base) and the merged
    model (transformers loads it) give the same logits; asked for before the run has finished, a 409."""
    import io
    import zipfile

    import httpx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = server.client
    job = client.fine_tuning.jobs.create(
        model="llama",
        training_file=upload(client, workspace / "train.jsonl").id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    exports = f"http://127.0.0.1:{server.port}/api/runs/{job.id}/exports"
    early = httpx.post(f"{exports}/merged")
    assert early.status_code == 409 and "has not finished" in early.json()["error"]["message"]
    assert wait(client, job.id).status == "succeeded"
    listed = {e["kind"]: e for e in httpx.get(exports).json()["exports"]}
    assert {k: (e["available"], e["state"]) for k, e in listed.items()} == {
        "adapter": (True, "none"),
        "merged": (True, "none"),
        "gguf": (True, "none"),
    }
    assert httpx.get(f"{exports}/merged/file").status_code == 404  # not made yet
    assert httpx.post(f"{exports}/nope").status_code == 404
    for kind in ("adapter", "merged"):
        assert httpx.post(f"{exports}/{kind}").status_code == 202
    done = wait_until(
        lambda: all(e["state"] == "done" for e in httpx.get(exports).json()["exports"] if e["kind"] != "gguf"),
        120,
        "the exports",
    )
    assert done
    folders = {}
    for kind in ("adapter", "merged"):
        answer = httpx.get(f"{exports}/{kind}/file")
        assert answer.status_code == 200
        assert answer.headers["content-disposition"] == f'attachment; filename="{job.id}-{kind}.zip"'
        folders[kind] = tmp_path / kind
        zipfile.ZipFile(io.BytesIO(answer.content)).extractall(folders[kind])
    assert (folders["adapter"] / "adapter_config.json").is_file() and not (
        folders["merged"] / "adapter_config.json"
    ).exists()
    ids = AutoTokenizer.from_pretrained(folders["merged"])("What is 3 plus 3?", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(folders["merged"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "llama"), folders["adapter"])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_tool_calling_job_trains_and_its_model_calls_tools(tmp_path):
    """OpenAI's function-calling rows: the job trains them (the model's template takes no tools, so with
    tunelab's Hermes-style ChatML template) and the `ft:` model answers with tool_calls."""
    from helpers import WEATHER

    tiny_llama_dir(tmp_path / "llama", positions=2048)  # the tools in the prompt: ~600 tokens of this tokenizer

    rows = [
        {
            "tools": [WEATHER],
            "messages": [
                {"role": "user", "content": f"How warm is it in {city}?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": json.dumps({"city": city, "unit": "celsius"}),
                            },
                        }
                    ],
                },  # fmt: skip
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
                {"role": "assistant", "content": f"21 degrees in {city}."},
            ],
        }
        for city in ("Paris", "Rome") * 4
    ]
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = Server(tmp_path / "llama", tmp_path / "data")
    try:
        client = server.client
        hyper = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
        train = upload(client, tmp_path / "tools.jsonl")
        job = wait(client, client.fine_tuning.jobs.create(model="llama", training_file=train.id, method=hyper).id)
        assert job.status == "succeeded", job.error
        assert "template: hermes" in (server.data / "jobs" / job.id / "config.yaml").read_text()
        reply = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": "How warm is it in Rome?"}],
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,  # one call (a tiny model may otherwise call again and again)
            max_tokens=400,  # a character-level tokenizer: the call is ~80 tokens
        )
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0].message.content
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "unit"}
    finally:
        server.stop()


def test_a_key_guards_every_route_and_uploads_are_bounded(workspace, tmp_path):
    server = Server(workspace / "llama", tmp_path / "data", "--api-key", "sesame", "--max-upload-mb", "1", key="sesame")
    try:
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="guess", max_retries=0)
        for call in (
            lambda: wrong.files.list(),
            lambda: wrong.fine_tuning.jobs.list(),
            lambda: wrong.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune"),
        ):
            with pytest.raises(openai.AuthenticationError):
                call()
        big = b'{"messages": []}\n' * ((2 << 20) // 17)
        with pytest.raises(openai.APIStatusError) as e:
            server.client.files.create(file=("big.jsonl", big), purpose="fine-tune")
        assert e.value.status_code == 413
        import httpx

        def chunked():  # no Content-Length: the server counts the bytes as they come
            yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            for _ in range(40):
                yield b"x" * (64 << 10)
            yield b"\r\n--b--\r\n"

        answer = httpx.post(
            f"http://127.0.0.1:{server.port}/v1/files",
            content=chunked(),
            timeout=30,
            headers={"Authorization": "Bearer sesame", "Content-Type": "multipart/form-data; boundary=b"},
        )
        assert answer.status_code == 413 and answer.json()["error"]["param"] == "file"
        assert list(server.client.files.list()) == [] and not list((tmp_path / "data" / "files").glob("*"))
    finally:
        server.stop()


def start_a_long_job(server: Server, workspace: Path, **create):
    """A job on long.jsonl, once it is running and has written its first checkpoint: (its file, the job)."""
    long = upload(server.client, workspace / "long.jsonl")
    job = server.client.fine_tuning.jobs.create(model="llama", training_file=long.id, **create)
    wait(server.client, job.id, until=("running",))
    wait_until(lambda: list(server.client.fine_tuning.jobs.checkpoints.list(job.id)), what="its first checkpoint")
    return long, job


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the child dies with its server on Linux")
def test_a_job_survives_a_killed_server_and_ends_as_an_uninterrupted_one(workspace, tmp_path):
    """kill -9 the server mid-training: its training subprocess dies with it; started again on the same data
    directory, the server resumes the job from its last checkpoint, and the job's losses are those of the
    same job run without interruption."""
    server = Server(workspace / "llama", tmp_path / "data")
    hyper = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}
    try:
        long, job = start_a_long_job(server, workspace, seed=11, method=hyper)
        trainers = children(server.process.pid)
        assert trainers and server.client.fine_tuning.jobs.retrieve(job.id).status == "running"
    finally:
        server.stop(signal.SIGKILL)
    deadline = time.time() + 10
    while any(running(pid) for pid in trainers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in trainers), "training outlived its server"
    server = Server(workspace / "llama", tmp_path / "data")
    try:
        client = server.client
        assert [f.id for f in client.files.list()] == [long.id]  # the old server's file and job are there
        resumed = wait(client, job.id)
        assert resumed.status == "succeeded", resumed.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        assert "The server restarted: the job resumes from its last checkpoint" in messages
        again = wait(
            client, client.fine_tuning.jobs.create(model="llama", training_file=long.id, seed=11, method=hyper).id
        )
        assert again.status == "succeeded", again.error
        interrupted, uninterrupted = metrics(client, job.id), metrics(client, again.id)
        assert sorted(interrupted) == sorted(uninterrupted) == list(range(1, max(uninterrupted) + 1))
        # the same to the 5th digit: two runs of one training have read apart in the 6th from their first step
        # on (6.007516 against 6.007512, machine C, bf16), before any interruption; a wrong resume moves them far more
        assert [interrupted[s]["train_loss"] for s in sorted(interrupted)] == pytest.approx(
            [uninterrupted[s]["train_loss"] for s in sorted(uninterrupted)], rel=1e-5
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_a_job_on_two_processes_trains_and_serves_its_model(workspace, tmp_path):
    """`--job-processes 2`: the job's `tunelab train` runs on two processes (DDP), sharing out its batch."""
    server = Server(workspace / "llama", tmp_path / "data", "--job-processes", "2")
    try:
        client = server.client
        train = upload(client, workspace / "train.jsonl")
        hyper = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
        job = wait(client, client.fine_tuning.jobs.create(model="llama", training_file=train.id, method=hyper).id)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert "Training on 2 processes: 2 examples each a step, 4 in all" in messages
        summary = json.loads((tmp_path / "data" / "jobs" / job.id / "run" / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["distributed"] == "ddp"
        assert metrics(client, job.id) and list(client.fine_tuning.jobs.checkpoints.list(job.id))
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=4
        )
        assert reply.usage.completion_tokens > 0
    finally:
        server.stop()


LOCAL_TORCHRUN = (
    "exec {python} -m torch.distributed.run --standalone --nproc_per_node {processes} -m tunelab {args} "
    "train.distributed=fsdp"
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the child dies with its server on Linux")
def test_a_launch_template_runs_the_job_through_torchrun_and_dies_with_the_server(workspace, tmp_path):
    """The operator's launch command (here torchrun on this machine, FSDP): the job trains through it; a
    killed server takes the launcher and its processes with it, and the restarted one resumes the job."""
    flags = ("--job-processes", "2", "--job-launch", LOCAL_TORCHRUN)
    server = Server(workspace / "llama", tmp_path / "data", *flags)
    hyper = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}}
    try:
        _, job = start_a_long_job(server, workspace, seed=3, method=hyper)
        launcher = children(server.process.pid)
        trainers = [pid for parent in launcher for pid in children(parent)]
        assert len(launcher) == 1 and len(trainers) == 2  # torchrun (exec'd by the shell) and its two workers
    finally:
        server.stop(signal.SIGKILL)
    deadline = time.time() + 10
    while any(running(pid) for pid in launcher + trainers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in launcher + trainers), "training outlived its server"
    server = Server(workspace / "llama", tmp_path / "data", *flags)
    try:
        resumed = wait(server.client, job.id)
        assert resumed.status == "succeeded", resumed.error
        run = tmp_path / "data" / "jobs" / job.id / "run"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["distributed"] == "fsdp"
        assert (sorted((run / "checkpoints").glob("step-*"))[-1] / "sharded" / ".metadata").is_file()
    finally:
        server.stop()


def test_a_launch_template_with_a_mistake_stops_the_server_before_it_starts(workspace, tmp_path):
    tunelab = Path(sys.executable).parent / "tunelab"
    for template, said in (
        ("srun {python} -m tunelab {arg}", "--job-launch: unknown placeholder {arg}; the template may use {python}"),
        ("srun {python} -m tunelab train", "--job-launch: the template must pass {args}"),
        ("srun {python -m tunelab {args}", "--job-launch: "),
    ):
        done = subprocess.run(
            [str(tunelab), "serve", str(workspace / "llama"), "--data-dir", str(tmp_path), "--job-launch", template],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
