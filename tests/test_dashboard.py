"""The dashboard on `tunelab serve`, in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium, against a live server on 127.0.0.1 over a fixture runs directory.
Every test saves a screenshot under its tmp dir."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import live, write_run
from tiny_models import tiny_llama_dir

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed: .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip("the dashboard tests need a browser: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def talkative(folder: Path) -> None:
    """An output layer of its own, larger than the embedding: the tiny model's greedy answer is then varied
    text (with the tied embedding it repeats one newline, which a page shows as nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    )
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    root = tmp_path_factory.mktemp("dashboard")
    talkative(tiny_llama_dir(root / "llama"))
    runs = root / "runs"
    write_run(runs / "sft-small", "sft", "smollm2-135m-instruct", 1e-3, [2.0, 1.8, 1.7, 1.5])
    write_run(runs / "sft-large-lr", "sft", "smollm2-135m-instruct", 5e-3, [2.0, 1.6, 1.9, 1.4])
    write_run(runs / "nested" / "dpo-run", "dpo", "gemma3-270m", 5e-4, [0.69, 0.6])
    write_run(runs / "live", "sft", "gemma3-270m", 2e-4, [2.5, 2.4], finished=False)
    grpo = write_run(runs / "grpo-run", "grpo", "smollm2-135m-instruct", 1e-5, [0.0, 0.01, -0.02])
    with open(grpo / "metrics.jsonl", "a") as f:  # what a grpo run logs beside its loss
        for step, split in ((1, "train"), (2, "train"), (3, "train"), (3, "eval")):
            row = {"reward": 0.1 * step, "reward/correct": 0.05 * step, "reward/formatted": 0.5, "clip": 0.01}
            f.write(json.dumps({"step": step, "split": split, **row}) + "\n")
    instruct = write_run(runs / "cq" / "runs" / "instruct", "sft", "gemma3-270m", 2e-4, [2.1, 1.9])
    (runs / "cq" / "report.html").write_text("<html><body><h1>fine-tuning vs instruction-tuning</h1></body></html>")
    (runs / "cq" / "results" / "instruct").mkdir(parents=True)  # a comparison keeps an arm's evaluations there
    (runs / "cq" / "results" / "instruct" / "in-task.json").write_text(
        json.dumps({"data": "dialogsum.test.jsonl", "examples": 30, "metrics": {"rougeL": 21.5}})
    )
    (instruct / "eval").mkdir()
    rows = [
        {"task": "task1", "category": "qa", "prediction": "Paris", "references": ["Paris"], "rougeL": 100.0},
        {"task": "task2", "category": "sum", "prediction": "a cat", "references": ["the cat sat"], "rougeL": 40.0},
    ]
    (instruct / "eval" / "suite-tasks.json").write_text(
        json.dumps(
            {
                "suite": "sni/tasks",
                "scores": {
                    "overall": {"rougeL": 70.0, "exact_match": 50.0, "instances": 2},
                    "per_task": {
                        "task1": {"rougeL": 100.0, "exact_match": 100.0, "instances": 1},
                        "task2": {"rougeL": 40.0, "exact_match": 0.0, "instances": 1},
                    },
                },
                "predictions": rows,
            }
        )
    )
    (runs / "live" / "progress.json").write_text(
        json.dumps({"step": 2, "total_steps": 20, "updated_at": time.time(), "eta_seconds": 60, "tokens_per_s": 50.0})
    )
    store = ModelStore([str(root / "llama")], runs)
    with live(create_app(store)) as url:
        yield url.removesuffix("/v1"), runs


def wait_for(condition, seconds: float = 15.0, what: str = "the page"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not come within {seconds} s")


def open_page(browser, url: str) -> None:
    """A fresh page (not a hash change in the last test's page, which keeps its state)."""
    browser.get("about:blank")
    browser.get(url)


def shot(browser, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one


def test_the_runs_page_lists_every_run_sorts_and_filters(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _ = site
    open_page(browser, url + "/#/")
    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr"), what="the runs table")
    assert {r.get_attribute("data-run") for r in rows} == {
        "sft-small",
        "sft-large-lr",
        "nested/dpo-run",
        "live",
        "cq/runs/instruct",
        "grpo-run",
    }
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#reports a.report")] == ["cq"]
    statuses = {r.get_attribute("data-run"): r.find_element(By.CSS_SELECTOR, ".status").text for r in rows}
    assert statuses["sft-small"] == "finished" and statuses["live"] == "running"
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="name"]').click()  # sort by name, ascending
    names = [r.get_attribute("data-run") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
    assert names == sorted(names)
    Select(browser.find_element(By.ID, "filter-method")).select_by_visible_text("dpo")
    assert [r.get_attribute("data-run") for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")] == [
        "nested/dpo-run"
    ]
    shot(browser, tmp_path, "runs")


def test_a_growing_run_gains_chart_points_without_a_reload(browser, site, tmp_path):
    from selenium.webdriver.common.by import By

    url, runs = site
    open_page(browser, url + "/#/run/live")
    chart = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chart-0[data-points]"), what="the loss chart")[0]
    assert chart.get_attribute("data-points") == "2"
    browser.execute_script("window.__same_page = true")  # gone if the page reloads
    with open(runs / "live" / "metrics.jsonl", "a") as f:
        for step in (3, 4, 5):
            f.write(
                json.dumps({"step": step, "split": "train", "loss": 2.5 - step / 10, "lr": 2e-4, "tokens": 100 * step})
                + "\n"
            )
        f.write(json.dumps({"step": 5, "split": "eval", "loss": 2.3, "accuracy": 0.5}) + "\n")
    wait_for(lambda: browser.find_element(By.ID, "chart-0").get_attribute("data-points") == "5", what="new points")
    assert browser.execute_script("return window.__same_page") is True
    assert browser.find_element(By.ID, "run-step").text.startswith("5")
    shot(browser, tmp_path, "run")


def test_a_grpo_runs_page_draws_each_reward_functions_curve(browser, site, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = site
    open_page(browser, url + "/#/run/grpo-run")
    chart = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chart-functions[data-points]"), what="the chart")
    assert chart[0].get_attribute("data-points") == "3"
    legend = chart[0].text
    assert all(name in legend for name in ("train correct", "eval correct", "train formatted", "eval formatted"))
    for chart_id, points in (("chart-4", "3"), ("chart-6", "3")):  # the reward, and the clipped fraction
        assert browser.find_element(By.ID, chart_id).get_attribute("data-points") == points
    shot(browser, tmp_path, "grpo-run")


def test_a_runs_page_shows_its_held_out_suite_per_task_and_its_comparisons_report(browser, site, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    url, _ = site
    open_page(browser, url + "/#/run/" + "cq%2Fruns%2Finstruct")
    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "table.suite tbody tr"), what="the suite's table")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == ["task1", "task2"]
    assert "Paris" in browser.find_element(By.CSS_SELECTOR, "table.predictions").text
    link = browser.find_element(By.PARTIAL_LINK_TEXT, "comparison's report")
    assert "fine-tuning vs instruction-tuning" in httpx.get(link.get_attribute("href")).text
    evaluations = httpx.get(url + "/api/runs/cq%2Fruns%2Finstruct").json()["evaluations"]
    assert {
        "name": "in-task",
        "data": "dialogsum.test.jsonl",
        "metrics": {"examples": 30, "rougeL": 21.5},
    } in evaluations
    shot(browser, tmp_path, "suite")


def test_comparing_two_runs_shows_only_the_keys_that_differ(browser, site, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = site
    open_page(browser, url + "/#/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr"), what="the runs table")
    for name in ("sft-small", "sft-large-lr"):
        browser.find_element(By.CSS_SELECTOR, f'input.pick[data-run="{name}"]').click()
    browser.find_element(By.ID, "compare-picked").click()
    rows = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#differing tbody tr[data-key]"), what="the differing keys"
    )
    keys = {r.get_attribute("data-key") for r in rows}
    assert keys == {"train.lr", "output_dir"}  # method, model, data and the rest are the same
    wait_for(
        lambda: browser.find_element(By.ID, "compare-chart").get_attribute("data-points") == "4", what="the overlay"
    )
    shot(browser, tmp_path, "compare")


def test_the_playground_streams_a_tiny_models_answer(browser, site, tmp_path):
    import openai
    from selenium.webdriver.common.by import By

    url, _ = site
    open_page(browser, url + "/#/playground")
    wait_for(lambda: browser.find_elements(By.ID, "send"), what="the playground")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    browser.find_element(By.ID, "send").click()
    answer = browser.find_element(By.ID, "answer-a")
    wait_for(lambda: answer.get_attribute("data-done") == "true", seconds=60, what="the answer")
    assert int(answer.get_attribute("data-chunks") or 0) >= 2  # it came in pieces
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    want = client.chat.completions.create(
        model="llama",
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "Give three tips for staying healthy."}],
    )
    assert len(set(want.choices[0].message.content)) > 4  # visible, varied text
    assert answer.get_attribute("textContent") == want.choices[0].message.content  # the same greedy answer, whole
    assert browser.find_element(By.ID, "answer-b").get_attribute("textContent") == want.choices[0].message.content
    shot(browser, tmp_path, "playground")


def test_a_run_name_never_reaches_outside_the_runs_directory(browser, site, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By

    url, _ = site
    for path in (
        "/api/runs/..%2F..%2Fetc",
        "/runs/..%2F..%2Fetc",
        "/api/runs/..%2Fruns%2Flive",
        "/api/runs/live/files/..%2Fconfig.yaml",
        "/api/runs/%2Fetc%2Fpasswd/metrics",
        "/static/..%2F__init__.py",
    ):
        assert httpx.get(url + path).status_code == 404, path
    open_page(browser, url + "/#/run/..%2F..%2Fetc")
    error = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "main .error"), what="the error")
    assert "no run named" in error[0].text
    shot(browser, tmp_path, "traversal")


def test_with_a_key_the_page_asks_for_it_once_then_shows_the_runs(browser, tmp_path):
    import base64

    import httpx
    from selenium.webdriver.common.by import By

    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    talkative(tiny_llama_dir(tmp_path / "llama"))
    run = write_run(tmp_path / "runs" / "one", "sft", "smollm2-135m-instruct", 1e-3, [2.0, 1.5])
    (run / "confusion_matrix.png").write_bytes(
        base64.b64decode(  # a 1 x 1 PNG
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
        )
    )
    with live(create_app(ModelStore([str(tmp_path / "llama")], tmp_path / "runs"), api_key="sesame")) as url:
        root = url.removesuffix("/v1")
        assert httpx.get(root + "/api/runs").status_code == 401  # the data needs the key; the page's shell does not
        open_page(browser, root + "/#/")
        browser.execute_script("sessionStorage.clear()")
        open_page(browser, root + "/#/")

        def give(key: str) -> None:
            field = wait_for(lambda: browser.find_elements(By.ID, "key-input"), what="the key form")[0]
            field.send_keys(key)
            browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

        give("guess")
        error = wait_for(lambda: browser.find_elements(By.ID, "key-error"), what="the refusal")
        assert "refused that key" in error[0].text and not browser.find_elements(By.ID, "runs")
        shot(browser, tmp_path, "key-form")
        give("sesame")
        rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr"), what="the runs table")
        assert [r.get_attribute("data-run") for r in rows] == ["one"]
        open_page(browser, root + "/#/run/one")  # the tab keeps the key: no form again
        image = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "img.plot"), what="the confusion matrix")[0]
        wait_for(
            lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 1, what="the plot's pixels"
        )
        assert image.get_attribute("src").startswith("blob:")  # fetched with the key
        open_page(browser, root + "/#/playground")
        wait_for(lambda: browser.find_elements(By.ID, "send"), what="the playground")[0].click()
        answer = browser.find_element(By.ID, "answer-a")
        wait_for(lambda: answer.get_attribute("data-done") == "true", seconds=60, what="the answer")
        assert answer.get_attribute("textContent") and not answer.find_elements(By.CSS_SELECTOR, ".error")
        shot(browser, tmp_path, "keyed-playground")


def text_of(browser, element_id: str) -> str | None:
    """An element's text as the page has it now (read in one script: a page drawn again has a new element)."""
    return browser.execute_script(f"const e = document.getElementById('{element_id}'); return e && e.textContent")


def chats(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(n)
    ]


def test_a_job_made_on_the_new_job_page_trains_live_and_its_gguf_downloads(browser, tmp_path):
    """The new-job page end to end, against `tunelab serve` with a key and a data directory: a file with a bad
    line is shown by line and nothing is submitted; the fixed file makes a job whose page follows its curve
    as it grows; another job is paused, resumed and cancelled from its page; the finished job's GGUF is made
    on the server, downloaded, and loads in llama.cpp."""
    from helpers import Server
    from llama_cpp_child import in_child, tokens_and_logits
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    talkative(tiny_llama_dir(tmp_path / "llama"))
    rows = chats(1600)  # some 18 steps an epoch (batch 3, packed): 10 epochs take 10 s or more to watch
    good = tmp_path / "sums.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = [json.dumps(r) for r in rows]
    broken[2] = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]})
    bad = tmp_path / "sums-draft.jsonl"
    bad.write_text("\n".join(broken) + "\n")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    server = Server(tmp_path / "llama", tmp_path / "data", "--api-key", "sesame", key="sesame")
    client = server.client
    root = f"http://127.0.0.1:{server.port}"
    try:
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        open_page(browser, root + "/#/new")
        browser.execute_script("sessionStorage.clear()")
        open_page(browser, root + "/#/new")
        wait_for(lambda: browser.find_elements(By.ID, "key-input"), what="the key form")[0].send_keys("sesame")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

        # a bad line: shown by line, nothing submitted, the upload gone again
        wait_for(lambda: browser.find_elements(By.ID, "training_file"), what="the form")[0].send_keys(str(bad))
        problems = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#problems tbody tr"), what="the problems")
        assert len(problems) == 1
        cells = [c.text for c in problems[0].find_elements(By.TAG_NAME, "td")]
        assert "sums-draft.jsonl" in cells[0] and cells[1] == "3" and "bot" in cells[2], cells
        assert "Nothing was submitted" in browser.find_element(By.ID, "check-summary").text
        assert browser.find_element(By.ID, "submit").get_attribute("disabled") is not None
        assert not list(client.fine_tuning.jobs.list())
        wait_for(lambda: not list(client.files.list()), what="the bad upload's deletion")
        shot(browser, tmp_path, "new-job-problem")

        # fixed: checked clean, the auto values shown, submitted through the jobs API
        browser.find_element(By.ID, "training_file").send_keys(str(good))
        summary = wait_for(
            lambda: [e for e in browser.find_elements(By.ID, "check-summary") if e.text.startswith("Ready")],
            what="the clean check",
        )[0]
        assert "1,600 training examples" in summary.text
        assert browser.find_element(By.ID, "n_epochs").get_attribute("placeholder") == "auto (3)"
        assert browser.find_element(By.ID, "batch_size").get_attribute("placeholder") == "auto (3)"  # 0.2% of 1,600
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "llama"
        browser.find_element(By.ID, "n_epochs").send_keys("10")
        browser.find_element(By.ID, "suffix").send_keys("sums")
        browser.find_element(By.ID, "wandb_project").send_keys("from-the-page")  # W&B offline (the server's env)
        shot(browser, tmp_path, "new-job")
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: browser.current_url.split("#")[-1].startswith("/run/ftjob-"), what="the job's page")
        job_id = browser.current_url.split("#/run/")[-1]
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.user_provided_suffix == "sums" and job.method.supervised.hyperparameters.n_epochs == 10
        assert job.integrations[0].wandb.project == "from-the-page"
        other = client.fine_tuning.jobs.create(model="llama", training_file=job.training_file)  # queued behind it

        # its curve grows on the page while it trains
        seen: set[int] = set()
        deadline = time.time() + 180
        while len(seen) < 3:
            assert time.time() < deadline, f"the loss chart did not grow: {seen}"
            points = browser.execute_script(
                "const c = document.getElementById('chart-0'); return c && c.dataset.points ? Number(c.dataset.points) : 0"
            )
            if points:
                seen.add(points)
            assert client.fine_tuning.jobs.retrieve(job_id).status in ("validating_files", "queued", "running"), seen
            time.sleep(0.3)
        shot(browser, tmp_path, "job-running")

        # the other job: paused, resumed and cancelled with its page's buttons
        open_page(browser, root + f"/#/run/{other.id}")
        for action, status in (("pause", "paused"), ("resume", "queued running"), ("cancel", "cancelled")):
            button = wait_for(
                lambda a=action: [
                    b for b in browser.find_elements(By.CSS_SELECTOR, f'button[data-action="{a}"]') if b.is_enabled()
                ],
                what=f"the {action} button",
            )[0]
            button.click()
            wait_for(lambda s=status: client.fine_tuning.jobs.retrieve(other.id).status in s.split(), what=status)
            wait_for(lambda s=status: text_of(browser, "run-status") in s.split(), what=f"{status} on the page")

        # the first job finishes; its GGUF is made on the server and downloaded
        open_page(browser, root + f"/#/run/{job_id}")
        wait_for(lambda: text_of(browser, "run-status") == "succeeded", seconds=300, what="success")
        model = client.fine_tuning.jobs.retrieve(job_id).fine_tuned_model
        link = wait_for(lambda: browser.find_elements(By.ID, "try-model"), what="the playground link")[0]
        assert link.get_attribute("href").endswith(f"#/playground?model={model.replace(':', '%3A')}&base=llama")
        prepare = wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-kind="gguf"] button[data-export]'), what="Prepare"
        )[0]
        assert browser.find_element(By.CSS_SELECTOR, 'tr[data-kind="adapter"]').get_attribute("data-state") == "none"
        prepare.click()
        wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-kind="gguf"][data-state="running"] progress'),
            what="the export's progress",
        )
        download = wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-kind="gguf"][data-state="done"] a.download'),
            seconds=180,
            what="the GGUF",
        )[0]
        shot(browser, tmp_path, "job-downloads")
        download.click()
        gguf = downloads / f"{job_id}-q8_0.gguf"
        wait_for(lambda: gguf.is_file() and not list(downloads.glob("*.crdownload")), seconds=60, what="the download")
        assert gguf.read_bytes()[:4] == b"GGUF"
        [(ids, logits)] = in_child(tokens_and_logits, str(gguf), ["What is 2 plus 2?"])
        assert ids and len(logits) == len(ids) and all(len(row) == len(logits[0]) for row in logits)
    finally:
        server.stop()


def test_exports_wait_their_turn_in_a_bounded_queue(tmp_path):
    """One export at a time, a few waiting, the next refused (429); an export asked for twice is one; an
    adapter of a full fine-tune and any export of an unfinished run are refused with why."""
    import threading

    from tunelab.dashboard.exports import Exports
    from tunelab.errors import RequestError

    exports = Exports(max_waiting=2)
    idle = threading.Thread(target=lambda: None)
    idle.start()
    idle.join()
    exports.thread = idle  # a worker that takes nothing: what is asked for waits
    for name in ("a", "b", "c"):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "adapter_config.json").write_text("{}")
    (tmp_path / "full" / "final").mkdir(parents=True)
    (tmp_path / "unfinished").mkdir()
    assert exports.start(tmp_path / "a", "merged")["state"] == "queued"
    assert exports.start(tmp_path / "a", "merged")["state"] == "queued" and len(exports.queue) == 1
    assert exports.start(tmp_path / "b", "gguf")["stage"] == "waiting (1 ahead)"
    for run, kind, status, says in (
        (tmp_path / "c", "adapter", 429, "2 are waiting"),
        (tmp_path / "full", "adapter", 400, "a full fine-tune has no adapter"),
        (tmp_path / "unfinished", "gguf", 409, "the run has not finished"),
        (tmp_path / "a", "onnx", 404, "expected adapter, merged, gguf"),
    ):
        with pytest.raises(RequestError) as refused:
            exports.start(run, kind)
        assert refused.value.status == status and says in refused.value.message
    listed = {e["kind"]: e for e in exports.listing(tmp_path / "full")}
    assert not listed["adapter"]["available"] and listed["merged"]["available"] and listed["merged"]["state"] == "none"
    with pytest.raises(RequestError) as missing:
        exports.file(tmp_path / "a", "merged")
    assert missing.value.status == 404


def test_a_reinforcement_job_from_the_page_checks_its_grader(browser, tmp_path):
    """The new-job page's third method: OpenAI's reinforcement rows checked as such, the grader checked by
    the server as it is typed (a wrong operation named), and the job created with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tunelab.jobs.service import Jobs
    from tunelab.serve.app import create_app
    from tunelab.serve.store import ModelStore

    llama = tiny_llama_dir(tmp_path / "llama")
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}], "answer": w} for w in ("sea", "cat") * 8]
    data = tmp_path / "say.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = Jobs(tmp_path / "data", trainable={"llama": llama})
    with live(create_app(ModelStore([str(llama)]), jobs=jobs)) as url:
        open_page(browser, url.removesuffix("/v1") + "/#/new")
        Select(wait_for(lambda: browser.find_elements(By.ID, "method"), what="the form")[0]).select_by_value(
            "reinforcement"
        )
        browser.find_element(By.ID, "training_file").send_keys(str(data))
        summary = wait_for(
            lambda: [e for e in browser.find_elements(By.ID, "check-summary") if e.text.startswith("Ready")],
            what="the clean check",
        )[0]
        assert "16 training examples" in summary.text
        wait_for(lambda: "checked" in (text_of(browser, "grader-check") or ""), what="the default grader's check")
        area = browser.find_element(By.ID, "grader")
        area.clear()
        area.send_keys(
            json.dumps({"type": "string_check", "name": "g", "input": "x", "reference": "y", "operation": "equals"})
        )
        browser.find_element(By.ID, "suffix").click()  # leaving the field checks it
        wait_for(lambda: "operation: expected one of eq, ne, like, ilike" in (text_of(browser, "grader-check") or ""))
        area.clear()
        area.send_keys(
            json.dumps(
                {
                    "type": "string_check",
                    "name": "says",
                    "input": "{{ sample.output_text }}",
                    "reference": "{{ item.answer }}",
                    "operation": "ilike",
                }
            )
        )
        browser.find_element(By.ID, "submit").click()
        wait_for(lambda: browser.current_url.split("#")[-1].startswith("/run/ftjob-"), what="the job's page")
        job = jobs.db.job(browser.current_url.split("#/run/")[-1])
        assert job["method"]["type"] == "reinforcement" and job["method"]["reinforcement"]["grader"]["name"] == "says"
        jobs.runner.cancel(job["id"])
