"""`tunelab serve` on a network and in the user's own browser, against a live server on 127.0.0.1: the key
guards every data route (the dashboard's as OpenAI's), a web page the user visits cannot drive the server
(content types, Origin) nor read it through DNS rebinding (Host), no answer names a path of the server's
machine, and answering a request never installs anything. Raw requests (httpx, as a foreign page or a
rebinding attacker would send them) and the official `openai` client (what must keep working); the
page's key form is tested in a real browser in test_dashboard.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest
from helpers import live, write_run
from tiny_models import tiny_llama_dir

from tunelab.serve.app import create_app
from tunelab.serve.redact import Redactor
from tunelab.serve.security import Access, host_name
from tunelab.serve.store import ModelStore

CHAT = {"model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
EVIL = "http://evil.example.com"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security")
    tiny_llama_dir(root / "llama")
    write_run(root / "runs" / "one", "sft", "smollm2-135m-instruct", 1e-3, [2.0, 1.5])
    (root / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{2 * i}."},
                    ]
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    return root


def server_with_jobs(models: list[Path], runs: Path, data: Path, access: Access | None = None):
    """The app `tunelab serve` makes: its models, the runs below `runs`, files and jobs kept in `data`."""
    from tunelab.jobs.service import Jobs
    from tunelab.serve.store import describe_models, trainable

    described = describe_models([str(m) for m in models])
    jobs = Jobs(data, trainable(described))
    return create_app(ModelStore(described, runs, extra=jobs.models), jobs=jobs, access=access)


@pytest.fixture(scope="module")
def open_server(workspace):
    """No key, on 127.0.0.1: the default."""
    with live(server_with_jobs([workspace / "llama"], workspace / "runs", workspace / "data")) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def keyed_server(workspace):
    app = server_with_jobs(
        [workspace / "llama"], workspace / "runs", workspace / "keyed-data", Access(api_key="sesame")
    )
    with live(app) as url:
        yield url.removesuffix("/v1")


def port_of(root: str) -> str:
    return root.rsplit(":", 1)[1]


# --- the key ------------------------------------------------------------------------------------------


def test_with_a_key_every_data_route_needs_it_the_dashboards_as_openais(keyed_server):
    root, key = keyed_server, {"Authorization": "Bearer sesame"}
    routes = [
        "/api/runs",
        "/api/runs/one",
        "/api/runs/one/metrics",
        "/api/models",
        "/api/compare?run=one&run=one",
        "/v1/models",
        "/v1/models/llama",
        "/v1/files",
        "/v1/fine_tuning/jobs",
    ]
    for route in routes:
        for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": "sesame"}):
            answer = httpx.get(root + route, headers=headers)
            assert answer.status_code == 401, (route, headers)
            assert answer.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(root + route, headers=key).status_code == 200, route
    assert httpx.post(root + "/v1/chat/completions", json=CHAT).status_code == 401
    for shell in ("/", "/static/app.js", "/health"):  # the page's shell holds no data: it asks for the key
        assert httpx.get(root + shell).status_code == 200, shell
    assert "sesame" not in httpx.get(root + "/").text + httpx.get(root + "/static/app.js").text


def test_the_official_client_still_does_everything_with_the_key(keyed_server, workspace):
    client = openai.OpenAI(base_url=keyed_server + "/v1", api_key="sesame", max_retries=0)
    assert "llama" in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model="llama", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.completion_tokens > 0
    assert list(
        client.chat.completions.create(
            model="llama", max_tokens=2, stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
    )
    file = client.files.create(file=open(workspace / "train.jsonl", "rb"), purpose="fine-tune")  # multipart
    job = client.fine_tuning.jobs.create(model="llama", training_file=file.id)  # JSON
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # a POST with no body
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server + "/v1", api_key="guess", max_retries=0).models.list()


# --- cross-site requests ------------------------------------------------------------------------------


def test_json_routes_take_only_json(open_server):
    body = json.dumps(CHAT)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        answer = httpx.post(open_server + "/v1/chat/completions", content=body, headers=headers)
        assert answer.status_code == 415, kind
        error = answer.json()["error"]
        assert error["code"] == "unsupported_media_type" and "expected application/json" in error["message"]
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        answer = httpx.post(open_server + "/v1/chat/completions", content=body, headers={"Content-Type": kind})
        assert answer.status_code == 200, kind
    text = httpx.post(open_server + "/v1/files", json={"file": "x", "purpose": "fine-tune"})
    assert text.status_code == 415 and "expected multipart/form-data" in text.json()["error"]["message"]


def test_a_foreign_page_is_refused_and_the_servers_own_page_is_not(open_server, workspace):
    own = f"http://127.0.0.1:{port_of(open_server)}"
    upload = {
        "files": {"file": ("a.jsonl", (workspace / "train.jsonl").read_bytes())},
        "data": {"purpose": "fine-tune"},
    }
    for origin in (EVIL, "null", f"http://localhost:{port_of(open_server)}", "http://127.0.0.1:1"):
        answer = httpx.post(open_server + "/v1/files", headers={"Origin": origin}, **upload)
        assert answer.status_code == 403, origin
        assert answer.json()["error"]["code"] == "origin_not_allowed" and origin in answer.json()["error"]["message"]
        assert "access-control-allow-origin" not in answer.headers
        assert (
            httpx.post(open_server + "/v1/chat/completions", json=CHAT, headers={"Origin": origin}).status_code == 403
        )
        assert httpx.get(open_server + "/api/runs", headers={"Origin": origin}).status_code == 403
        preflight = httpx.options(
            open_server + "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert not list((workspace / "data" / "files").glob("*"))  # nothing was stored
    answer = httpx.post(open_server + "/v1/chat/completions", json=CHAT, headers={"Origin": own})  # the page's own
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_allowed_origins_get_cors_for_themselves_only(workspace):
    store = ModelStore([str(workspace / "llama")])
    app = create_app(store, access=Access(allowed_origins=("http://localhost:3000",)))
    with live(app) as url:
        root = url.removesuffix("/v1")
        preflight = httpx.options(
            root + "/v1/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        answer = httpx.post(url + "/chat/completions", json=CHAT, headers={"Origin": "http://localhost:3000"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert httpx.post(url + "/chat/completions", json=CHAT, headers={"Origin": EVIL}).status_code == 403
        assert "*" not in preflight.headers.get("access-control-allow-origin", "")


# --- DNS rebinding ------------------------------------------------------------------------------------


def test_a_foreign_host_is_refused_on_a_loopback_address(open_server):
    port = port_of(open_server)
    for host in (
        "evil.example.com",
        f"evil.example.com:{port}",
        "127.0.0.1.nip.io",
        f"localhost.evil.com:{port}",
        "192.168.1.10",
        "",
    ):
        for path in ("/v1/models", "/api/runs", "/", "/health"):
            answer = httpx.get(open_server + path, headers={"Host": host})
            assert answer.status_code == 403, (host, path)
            assert answer.json()["error"]["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost", f"LOCALHOST:{port}"):
        assert httpx.get(open_server + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_extend_the_names(workspace):
    store = ModelStore([str(workspace / "llama")])
    access = Access(allowed_hosts=("tunelab.internal", "*.lab.example"))
    with live(create_app(store, access=access)) as url:
        for host, status in (
            ("tunelab.internal:8000", 200),
            ("gpu1.lab.example", 200),
            ("lab.example.evil", 403),
            ("evil.example.com", 403),
            ("localhost", 200),
        ):
            assert httpx.get(url + "/models", headers={"Host": host}).status_code == status, host
    with live(create_app(store, access=Access(api_key="k", loopback=False))) as url:  # bound to 0.0.0.0: the key guards
        answer = httpx.get(url + "/models", headers={"Host": "tunelab.example.com", "Authorization": "Bearer k"})
        assert answer.status_code == 200
    store2 = ModelStore([str(workspace / "llama")])
    with live(create_app(store2, access=Access(api_key="k", loopback=False, allowed_hosts=("a.example",)))) as url:
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/models", headers={**headers, "Host": "a.example"}).status_code == 200
        assert httpx.get(url + "/models", headers={**headers, "Host": "b.example"}).status_code == 403


def test_host_names_are_read_without_their_port():
    assert host_name("127.0.0.1:8000") == "127.0.0.1" and host_name("[::1]:80") == "[::1]"
    assert host_name("LocalHost") == "localhost" and host_name("[::1") == "" and host_name("a:b") == "a:b"


# --- no server paths ----------------------------------------------------------------------------------


def test_no_answer_names_a_path_of_the_servers_machine(open_server, workspace):
    runs = str(workspace / "runs")
    row = httpx.get(open_server + "/api/runs").json()["runs"][0]
    detail = httpx.get(open_server + "/api/runs/one").json()
    assert detail["config"]["output_dir"] == "<runs>/one"
    for answer in (
        row,
        detail,
        httpx.get(open_server + "/api/runs/nothing").json(),
        httpx.post(open_server + "/v1/chat/completions", json={**CHAT, "model": str(workspace / "llama")}).json(),
    ):
        text = json.dumps(answer)
        assert runs not in text and str(workspace) not in text and os.path.realpath(workspace) not in text


def test_a_training_error_names_files_by_their_id(tmp_path):
    data = tmp_path / "data"
    names = {
        data: "<data>",
        data / "files" / "file-abc.jsonl": "file-abc (train.jsonl)",
        data / "jobs" / "ftjob-x" / "run": "ftjob-x",
        Path.home(): "~",
    }
    redactor = Redactor(lambda: names)
    message = (
        f"error: {data}/files/file-abc.jsonl: line 3: no assistant turn; see {data}/jobs/ftjob-x/run/train.log "
        f"and {data}/other.txt, not {data}base/x nor /x{data}"
    )
    assert redactor.value({"error": {"message": message}}) == {
        "error": {
            "message": (
                f"error: file-abc (train.jsonl): line 3: no assistant turn; see ftjob-x/train.log and <data>/other.txt, "
                f"not {data}base/x nor /x{data}"
            )
        }
    }
    assert redactor.value(["~", 1, None, {"k": f"{Path.home()}/.cache"}]) == ["~", 1, None, {"k": "~/.cache"}]


# --- lookups are read-only and cached -----------------------------------------------------------------


def forbid_installing(monkeypatch):
    import tunelab.models.resolve as resolve

    def installer(*args, **kwargs):
        pytest.fail("a request tried to install or import a model")

    monkeypatch.setattr(resolve, "install_package", installer)
    monkeypatch.setattr(resolve, "import_gguf", installer)


def adapter_run(folder: Path, base: str) -> Path:
    """A finished LoRA run whose adapter names `base` (a registry model not installed here)."""
    write_run(folder, "sft", base, 1e-3, [2.0, 1.5])
    (folder / "final").mkdir()
    (folder / "final" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": base, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4})
    )
    return folder


def test_a_run_whose_base_is_not_installed_is_a_404_and_nothing_installs(
    workspace, tmp_path, monkeypatch, tunelab_home
):
    forbid_installing(monkeypatch)
    adapter_run(tmp_path / "runs" / "ghost", "gemma3-270m")
    with live(server_with_jobs([workspace / "llama"], tmp_path / "runs", tmp_path / "data")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="ghost", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert "tunelab models pull gemma3-270m" in e.value.message
        assert "ghost" not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("ghost")
        file = client.files.create(file=("t.jsonl", (workspace / "train.jsonl").read_bytes()), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as e:  # a job on it would install it: refused at once
            client.fine_tuning.jobs.create(model="gemma3-270m", training_file=file.id)
        assert e.value.code == "model_not_available" and "tunelab models pull gemma3-270m" in e.value.message
    assert not tunelab_home.exists() or not list(tunelab_home.rglob("*.safetensors"))


def test_the_catalogue_is_scanned_at_most_every_few_seconds_or_on_a_miss(workspace, tmp_path, monkeypatch):
    import shutil

    store = ModelStore([str(workspace / "llama")], tmp_path / "runs", rescan_seconds=60)
    read = []
    described = store._served
    monkeypatch.setattr(store, "_served", lambda *a, **k: read.append(a[0]) or described(*a, **k))
    (tmp_path / "runs").mkdir()
    with live(create_app(store)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        for _ in range(5):
            assert [m.id for m in client.models.list()] == ["llama"]
        scans = store.catalogue.scanned_at
        client.chat.completions.create(model="llama", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
        assert store.catalogue.scanned_at == scans  # a known id: no scan
        run = tmp_path / "runs" / "late"  # a run that finishes while the server is up
        write_run(run, "sft", "llama", 1e-3, [2.0])
        shutil.copytree(workspace / "llama", run / "final")
        assert client.models.retrieve("late").id == "late"  # a miss scans again at once
        for _ in range(3):
            client.models.retrieve("late")
            store.catalogue.rescan()
        assert read == ["late"]  # described once, however often it is scanned


def test_a_job_model_is_listed_as_soon_as_it_is_named_and_listing_does_not_scan_otherwise(workspace, tmp_path):
    """A fine-tuning job that has just succeeded (the store's `extra`) is in GET /v1/models at once, not after
    the catalogue's next periodic scan; a listing that finds nothing new scans nothing."""
    import shutil

    jobs: dict[str, Path] = {}
    store = ModelStore([str(workspace / "llama")], None, rescan_seconds=60, extra=lambda: dict(jobs))
    with live(create_app(store)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["llama"]
        shutil.copytree(workspace / "llama", tmp_path / "final")
        jobs["ft:llama:tunelab:sums:abc123"] = tmp_path / "final"  # the job's status says succeeded now
        assert sorted(m.id for m in client.models.list()) == ["ft:llama:tunelab:sums:abc123", "llama"]
        scans = store.catalogue.scanned_at
        for _ in range(3):
            assert len(client.models.list().data) == 2
        assert store.catalogue.scanned_at == scans


def test_the_flags_are_checked_before_anything_starts(workspace):
    from conftest import run_cli

    for flag, value, expected in (
        ("--allowed-hosts", "http://a.example", "no scheme, no port"),
        ("--allowed-hosts", "a.example:8000", "no scheme, no port"),
        ("--allowed-origins", "a.example", "expected an origin such as"),
        ("--allowed-origins", "http://a.example/page", "no path"),
    ):
        code, _, err = run_cli("serve", str(workspace / "llama"), flag, value)
        assert code == 1 and f"{flag} {value}: " in err and expected in err and "Traceback" not in err, err
