"""Every shipped config is valid and opens with the exact command that runs it; the data it names exists
(or its builder writes it)."""

import importlib.util
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data.readers import parallel_paths

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
EXPERIMENTS = [p for p in CONFIGS if p.name.startswith(("compare-", "levers-"))]
RUN_CONFIGS = [p for p in CONFIGS if p not in EXPERIMENTS]
ROOT = Path(__file__).parents[1]
# Data derived from ../shared/data is built by a script, not kept in the repository: {folder: its builder}
BUILT = {"data/tool-use/": "benchmarks/tool_use.py", "data/arithmetic/": "benchmarks/grpo_arithmetic.py"}


def test_there_are_shipped_configs():
    assert {"sft-smollm2-alpaca.yaml", "sft-gemma3-alpaca.yaml", "compare-quick.yaml", "compare-gemma3.yaml"} <= {
        p.name for p in CONFIGS
    }


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_is_valid_and_headed_by_its_command(path):
    assert path.read_text().splitlines()[0] == f"# tunelab train configs/{path.name}"
    cfg = load_config(path).resolved()
    _data_exists(path, cfg)
    for spec in cfg.grpo.rewards:  # a reward function named relative to the repository root, and there
        from tunelab.train.rewards import python_function

        assert callable(python_function(str(ROOT / spec), "grpo.rewards"))


def _data_exists(path, cfg):
    for spec in filter(None, (cfg.data.train, cfg.data.eval, *(m.train for m in cfg.data.mix))):
        folder = next((f for f in BUILT if spec.startswith(f)), None)
        if folder:
            assert spec.removeprefix(folder) in _built(folder), f"{path.name}: {BUILT[folder]} does not write {spec}"
            continue
        files = parallel_paths(str(ROOT / spec)) or (ROOT / spec,)
        assert all(f.exists() for f in files), f"{path.name}: {spec} (relative to the repository root)"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_a_shipped_experiment_is_valid_and_headed_by_its_command(path):
    from tunelab.experiments.compare import load_experiment

    assert path.read_text().splitlines()[0] == f"# tunelab compare configs/{path.name}"
    exp, runs = load_experiment(path)
    assert {"task", "instruct"} <= set(runs)
    for cfg in runs.values():
        _data_exists(path, cfg)
    assert (ROOT / exp.test.data).exists() and all((ROOT / s.path).exists() for s in exp.suites)


_BUILDS: dict[str, dict[str, int]] = {}


def _built(folder: str) -> dict[str, int]:
    """{file name: rows} that the folder's builder writes (into a scratch folder; once per session)."""
    import tempfile

    if folder not in _BUILDS:
        spec = importlib.util.spec_from_file_location("builder", ROOT / BUILT[folder])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with tempfile.TemporaryDirectory() as out:
            _BUILDS[folder] = module.build(Path(out))
            assert all((Path(out) / name).stat().st_size for name in _BUILDS[folder])
    assert all(_BUILDS[folder].values()), _BUILDS[folder]
    return _BUILDS[folder]
