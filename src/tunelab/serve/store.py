"""What the server serves, by model id, and the models it has loaded.

An id is a registry name, the name of a local model directory or `.gguf` file, or a run's name (a run named
on the command line: its directory's name; a run below `--runs DIR`: its path below DIR, as the dashboard
names it, so two `*/instruct` runs are two models; a LoRA run is its adapter on its base). `--runs DIR`
adds every finished run below DIR (a run with a final/). The list is a catalogue kept in memory and scanned again at most every
`rescan_seconds`, or at once when a request names an id it does not hold, so runs that finish while the
server is up appear; a run already described is not read again unless its final/ changed. An id is only
ever a key of that list: it never becomes a path.

Answering a request never installs or imports anything: the models named on the command line are made
ready at start-up; a run whose base model is not installed here is listed among the unavailable, with
the command that installs it (`tunelab models pull`), and a request for it is a 404 that says so.

Models load on their first request. The adapters of one base share one copy of its weights (peft's
multi-adapter model: the adapter is chosen per request, or disabled for the base itself); past
`max_loaded` bases, the least recently used is unloaded.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.fs import Rescanned
from tunelab.rundir import RunDir, find_runs


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
    model: Any  # a transformers model, or a peft model holding every loaded adapter of this base
    tokenizers: dict[str, Any]  # served id -> its tokenizer (a run's carries its training template)
    adapters: set[str]
    stop_ids: set[int]
    compilers: dict[str, Any] = field(default_factory=dict)  # served id -> its structured outputs' grammars
    decoder: Any = None  # its written-out decode steps (`infer.steps.Decoder`): int8 or bf16, Llama family
    prefixes: Any = None  # the engine's `infer.decode.PrefixCache` of its prompts' beginnings (base rows)

    def grammars(self, model_id: str):
        """The grammar compiler of the served model's tokenizer (`infer.constrain.Grammars`), made once."""
        from tunelab.infer.constrain import Grammars

        if model_id not in self.compilers:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self.compilers[model_id] = Grammars(self.tokenizers[model_id], vocab_size, self.stop_ids)
        return self.compilers[model_id]


def describe_models(names: Sequence[str]) -> dict[str, Served]:
    """The models named on the command line, by id, made ready first (installed, imported: start-up is
    the one time the server may)."""
    return dict(ModelStore._describe(name) for name in names)


def trainable(models: Mapping[str, Served]) -> dict[str, Path]:
    """Of `models`, the causal LMs a fine-tuning job may start from (not adapters): id -> folder."""
    return {model_id: s.folder for model_id, s in models.items() if s.generates and not s.adapter}


class ModelStore:
    """`models`: names to describe (see `describe_models`), or models described already; `extra`: more ids
    -> model folders, read with the runs at every scan (the fine-tuning jobs' models)."""

    def __init__(
        self,
        models: Sequence[str] | Mapping[str, Served] = (),
        runs: Path | None = None,
        max_loaded: int = 2,
        precision: str = "fp32",
        rescan_seconds: float = 5.0,
        extra: Callable[[], dict[str, Path]] | None = None,
        quantize: str = "none",
    ):
        self.runs, self.max_loaded = runs, max_loaded
        self.precision = precision  # the weights' dtype when served: bf16 halves them and runs natively where it can
        self.quantize = quantize  # "int8": decode steps with int8 weights where the model's family allows
        self.fixed = dict(models) if isinstance(models, Mapping) else describe_models(models)
        self.loaded: OrderedDict[Path, Loaded] = OrderedDict()
        self.lock = threading.Lock()
        self.extra = extra or dict
        self.unavailable: dict[str, str] = {}  # id -> why it cannot be served here (its base is not installed)
        self.described: dict[tuple[Path, int, int], Served] = {}  # (folder, inode, mtime) -> what it is
        self.catalogue = Rescanned(self._scan, rescan_seconds)

    # --- what is served -------------------------------------------------------------------------------

    def served(self) -> dict[str, Served]:
        """The catalogue, scanned again when it is older than `rescan_seconds`, or at once when `extra` names
        a model it lacks (a fine-tuning job that just succeeded is listed as soon as its status says so)."""
        found = self.catalogue.all()
        if any(model_id not in found and model_id not in self.unavailable for model_id in self.extra()):
            found = self.catalogue.rescan()
        return found

    def get(self, model_id: str) -> Served | None:
        """The model `model_id` names; an id not in the catalogue scans again first (a run that just finished)."""
        return self.catalogue.get(model_id, rescan_on_miss=model_id not in self.unavailable)

    def _scan(self) -> dict[str, Served]:
        """The runs directory and the jobs' models read again (one scan at a time: `Rescanned` holds its lock)."""
        found, unavailable = dict(self.fixed), {}
        described: dict[tuple[Path, int, int], Served] = {}
        for model_id, folder in self._candidates():
            if model_id in found or model_id in unavailable:
                continue
            served = self._describe_folder(model_id, folder, described)
            if isinstance(served, Served):
                found[model_id] = served
            else:
                unavailable[model_id] = served
        self.unavailable, self.described = unavailable, described
        return found

    def forget(self, model_id: str) -> None:
        """Unload `model_id` (before its files go): its tokenizer, and its adapter from its base; and scan
        again at the next lookup."""
        with self.lock:
            for base, loaded in list(self.loaded.items()):
                loaded.tokenizers.pop(model_id, None)
                if model_id in loaded.adapters:
                    loaded.adapters.discard(model_id)
                    if not loaded.adapters:  # peft keeps the deleted adapter active: the base loads afresh
                        del self.loaded[base]
                        continue
                    loaded.model.delete_adapter(model_id)
                    loaded.model.set_adapter(next(iter(loaded.adapters)))
        self.catalogue.expire()

    def _candidates(self):
        """(id, model folder) of every finished run below `runs` (its path below it), then of the jobs' models."""
        for name, run in find_runs(self.runs).items():  # named by their path below --runs, as on the dashboard
            if run.is_finished():
                yield name, run.final
        yield from self.extra().items()

    def _describe_folder(self, model_id: str, folder: Path, described: dict) -> Served | str:
        """A run's model as served (read once per version of its folder, kept in `described` for the next
        scan), or why it cannot be served (asked again at every scan: its base may be installed since)."""
        try:
            stat = folder.stat()
            key = (folder, stat.st_ino, stat.st_mtime_ns)
        except OSError:
            return "its files are gone"
        served = self.described.get(key)
        if served is None:
            try:
                served = self._served(model_id, folder, prepare=False)
            except (UserError, OSError, ValueError) as e:
                if self.unavailable.get(model_id) != str(e):  # said once, not at every scan
                    print(f"tunelab serve: {model_id} cannot be served: {e}", file=sys.stderr, flush=True)
                return str(e)
        described[key] = served
        return replace(served, id=model_id)

    @staticmethod
    def _describe(name: str) -> tuple[str, Served]:
        from tunelab.models import REGISTRY, resolve_model

        path, run = Path(name), RunDir(name)
        if run.is_run():  # a run directory, served by its folder's name
            if not run.is_finished():
                raise UserError(f"{path}: the run has no final/ model yet (it has not finished)")
            return path.name, ModelStore._served(path.name, run.final)
        model_id = name if name in REGISTRY else path.stem if path.suffix == ".gguf" else path.name
        return model_id, ModelStore._served(model_id, resolve_model(name))

    @staticmethod
    def _served(model_id: str, folder: Path, prepare: bool = True) -> Served:
        from transformers import AutoConfig

        from tunelab.models.load import base_folder

        base = base_folder(folder, prepare)
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
        from tunelab.precision import training_device

        started = time.perf_counter()
        auto = AutoModelForCausalLM if served.generates else AutoModel
        model = auto.from_pretrained(served.base, dtype=weights_dtype(self.precision)).eval().to(training_device())
        decoder = self._decoder(model, served) if served.generates else None
        steps = (
            ""
            if decoder is None
            else f"; decode steps written out, {'int8' if self.quantize == 'int8' else self.precision}"
        )
        print(f"tunelab serve: loaded {served.base} in {time.perf_counter() - started:.1f} s{steps}", flush=True)
        return Loaded(model, {}, set(), set(), decoder=decoder)

    def _decoder(self, model, served: Served):
        """The written-out decode steps of a Llama-family model on the CPU (`infer.steps`): with int8 weights
        under --quantize int8, with its own in bf16 (a step in less time than its forward); None in fp32,
        whose steps are transformers' own (exactly `tunelab generate`'s answers), and for other families."""
        from tunelab.infer.steps import Decoder, unsupported

        quantize = self.quantize == "int8"
        if not quantize and self.precision != "bf16":
            return None
        reason = unsupported(model, quantize)
        if reason:
            if quantize:
                print(f"tunelab serve: {served.id}: {reason}; it decodes in {self.precision}", flush=True)
            return None
        return Decoder(model, quantize)

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
