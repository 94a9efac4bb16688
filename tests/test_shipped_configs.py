"""Every shipped config is valid and opens with the exact command that runs it."""

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data.readers import parallel_paths

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {"sft-smollm2-alpaca.yaml", "sft-gemma3-alpaca.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_is_valid_and_headed_by_its_command(path):
    assert path.read_text().splitlines()[0] == f"# tunelab train configs/{path.name}"
    cfg = load_config(path).resolved()
    root = Path(__file__).parents[1]
    for spec in filter(None, (cfg.data.train, cfg.data.eval)):
        files = parallel_paths(str(root / spec)) or (root / spec,)
        assert all(f.exists() for f in files), f"{path.name}: {spec} (relative to the repository root)"
