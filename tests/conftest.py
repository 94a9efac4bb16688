import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub: everything they load is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as tiny_gguf


@pytest.fixture
def tunelab_home(tmp_path, monkeypatch):
    """An empty model cache for the test."""
    home = tmp_path / "tunelab-home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run `tunelab ARGV` in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from tunelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


# The shared datasets, beside the repository (../shared/data), whatever the working directory.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def eval_entries(run: Path) -> list[dict]:
    """The evaluation lines of a run's metrics.jsonl."""
    import json

    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["split"] == "eval"]


def resume_from_an_earlier_checkpoint(run: Path) -> list[dict]:
    """Delete a finished run's last checkpoint and final/, `tunelab train --resume` it from the one
    before, and return its evaluations (a resumed run should log the ones it logged the first time)."""
    import shutil

    shutil.rmtree(sorted((run / "checkpoints").glob("step-*"))[-1])
    shutil.rmtree(run / "final")
    code, _, err = run_cli("train", "--resume", str(run))
    assert code == 0, err
    return eval_entries(run)
