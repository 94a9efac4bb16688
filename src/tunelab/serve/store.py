"""What the server serves, by model id, and the models it has loaded.

An id is a registry name, the name of a local model directory or `.gguf` file, or the name of a run (its
directory's name; a LoRA run is its adapter on its base). `--runs DIR` adds every finished run below DIR
(a run with a final/), looked up again whenever the list is read, so runs that finish while the server is
up appear. An id is only ever a key of that list: it never becomes a path.

Models load on their first request. The adapters of one base share one copy of its weights (peft's
multi-adapter model: the adapter is chosen per request, or disabled for the base itself); past
`max_loaded` bases, the least recently used is unloaded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError


@dataclass(frozen=True)
class Served:
    id: str
    folder: Path  # the model directory, or the run's final/ (an adapter directory for a LoRA run)
    base: Path  # the directory of the weights it runs on (its own folder, or the adapter's base)
    created: int
    generates: bool  # a causal LM (chat and completions) or an encoder (embeddings)

    @property
    def adapter(self) -> bool:
        return self.base != self.folder


@dataclass
class Loaded:
    model: object  # a transformers model, or a peft model holding every loaded adapter of this base
    tokenizers: dict[str, object]  # served id -> its tokenizer (a run's carries its training template)
    adapters: set[str]
    stop_ids: set[int]


class ModelStore:
    def __init__(self, names: list[str] = (), runs: Path | None = None, max_loaded: int = 2, precision: str = "fp32"):
        self.runs, self.max_loaded = runs, max_loaded
        self.precision = precision  # the weights' dtype when served: bf16 halves them and runs natively where it can
        self.fixed = dict(self._describe(name) for name in names)
        self.loaded: OrderedDict[Path, Loaded] = OrderedDict()
        self.lock = threading.Lock()
        self.extra = lambda: {}  # more ids -> model folders (the fine-tuning jobs' models), read with the runs

    # --- what is served -------------------------------------------------------------------------------

    def served(self) -> dict[str, Served]:
        found = dict(self.fixed)
        if self.runs is not None and self.runs.is_dir():
            for config in sorted(self.runs.rglob("config.yaml")):
                run = config.parent
                if (run / "final").is_dir() and run.name not in found:
                    found[run.name] = self._served(run.name, run / "final")
        for model_id, folder in self.extra().items():
            if model_id not in found:
                found[model_id] = self._served(model_id, folder)
        return found

    def forget(self, model_id: str) -> None:
        """Unload `model_id` (before its files go): its tokenizer, and its adapter from its base."""
        with self.lock:
            for loaded in self.loaded.values():
                loaded.tokenizers.pop(model_id, None)
                if model_id in loaded.adapters:
                    loaded.model.delete_adapter(model_id)
                    loaded.adapters.discard(model_id)

    def get(self, model_id: str) -> Served | None:
        return self.served().get(model_id)

    def _describe(self, name: str) -> tuple[str, Served]:
        from tunelab.models import REGISTRY, resolve_model

        path = Path(name)
        if (path / "config.yaml").is_file():  # a run directory
            if not (path / "final").is_dir():
                raise UserError(f"{path}: the run has no final/ model yet (it has not finished)")
            return path.name, self._served(path.name, path / "final")
        model_id = name if name in REGISTRY else path.stem if path.suffix == ".gguf" else path.name
        return model_id, self._served(model_id, resolve_model(name))

    @staticmethod
    def _served(model_id: str, folder: Path) -> Served:
        from transformers import AutoConfig

        from tunelab.models.load import base_folder

        base = base_folder(folder)
        architectures = AutoConfig.from_pretrained(base).architectures or []
        generates = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        return Served(model_id, folder, base, int(folder.stat().st_mtime), generates)

    # --- loading --------------------------------------------------------------------------------------

    def load(self, served: Served) -> Loaded:
        """The loaded model that serves `served` (loading its base and adapter on first use)."""
        with self.lock:
            loaded = self.loaded.get(served.base)
            if loaded is None:
                loaded = self._load_base(served)
                self.loaded[served.base] = loaded
                while len(self.loaded) > self.max_loaded:
                    self.loaded.popitem(last=False)  # the least recently used base, with its adapters
            self.loaded.move_to_end(served.base)
            if served.id not in loaded.tokenizers:
                self._add(loaded, served)
            return loaded

    def _load_base(self, served: Served) -> Loaded:
        from transformers import AutoModel, AutoModelForCausalLM

        from tunelab.models.load import weights_dtype
        from tunelab.train.precision import training_device

        started = time.perf_counter()
        auto = AutoModelForCausalLM if served.generates else AutoModel
        model = auto.from_pretrained(served.base, dtype=weights_dtype(self.precision)).eval().to(training_device())
        print(f"tunelab serve: loaded {served.base} in {time.perf_counter() - started:.1f} s", flush=True)
        return Loaded(model, {}, set(), set())

    def _add(self, loaded: Loaded, served: Served) -> None:
        from transformers import AutoTokenizer

        from tunelab.infer.generate import stop_token_ids

        if served.adapter:
            from peft import PeftModel

            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(served.folder, adapter_name=served.id)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, served.folder, adapter_name=served.id).eval()
            loaded.adapters.add(served.id)
        tokenizer = AutoTokenizer.from_pretrained(served.folder)
        if served.generates:  # the generation config's end tokens and this tokenizer's EOS end every row
            loaded.stop_ids |= stop_token_ids(loaded.model, tokenizer)
        loaded.tokenizers[served.id] = tokenizer
