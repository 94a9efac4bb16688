"""The run config: one typed schema, read from YAML, with dotted `key=value` overrides.

    cfg = load_config("configs/sft.yaml", ["train.lr=1e-4", "data.max_length=256"])

Every problem (a wrong type, an unknown key, a bad choice, a missing key, a bad combination) is
collected and raised together as one `UserError`, one line per problem, named by its key path and,
where the key came from the file, by its line: `cfg.yaml:7: train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab import methods as registry
from tunelab.data.batching import STRATEGIES as BATCHING
from tunelab.data.formats import FORMATS
from tunelab.data.options import DEFAULTS, DataOptions
from tunelab.data.render import TRUNCATION
from tunelab.errors import UserError
from tunelab.fs import atomic_write_text

if TYPE_CHECKING:
    from tunelab.data.dataset import Files, Split

METHODS = tuple(registry.METHODS)
TUNING_MODES = ("full", "lora", "freeze", "head")
DATA_FORMATS = ("auto", *FORMATS)
# every metric some method can keep its best step by, in the registry's order
BEST_METRICS = tuple(dict.fromkeys(m for method in registry.METHODS.values() for m in method.metrics))
# The choices as types, from the tuples their owners keep (mypy cannot read a tuple into a Literal; pydantic can)
MethodName = Literal[METHODS]  # type: ignore[valid-type]
TuningMode = Literal[TUNING_MODES]  # type: ignore[valid-type]
DataFormat = Literal[DATA_FORMATS]  # type: ignore[valid-type]
Truncation = Literal[TRUNCATION]  # type: ignore[valid-type]
Batching = Literal[BATCHING]  # type: ignore[valid-type]
BestMetric = Literal[BEST_METRICS]  # type: ignore[valid-type]

# Learning rates that work for each tuning mode when `train.lr` is not given: full fine-tuning
# needs a rate well below pre-training; adapters and a fresh head tolerate much larger ones.
DEFAULT_LR = {"full": 2e-5, "freeze": 5e-5, "lora": 2e-4, "head": 1e-3}


class Section(BaseModel):
    # Unknown keys are errors, never silently dropped.
    model_config = ConfigDict(extra="forbid")


class MixSource(Section):
    """One more training file of an sft run (`data.mix`), held out of and sampled on its own, then mixed in."""

    train: str = Field(description="the file: instruction or chat data, or (source, target) pairs")
    eval_split: float | None = Field(
        None, gt=0, description="hold out this share (< 1) or number (>= 1) of its examples for evaluation"
    )
    max_examples: int | None = Field(None, gt=0, description="train on at most this many of its examples")
    prompt: str | None = Field(
        None, description="(source, target) pairs: the user turn made from each source ({source}); default data.prompt"
    )


class DataConfig(Section):
    train: str = Field(
        description="training data: .json, .jsonl, .csv, .tsv (or .gz of them), parallel text as dir/train.{en,de}"
    )
    eval: str | None = Field(None, description="evaluation data file")
    eval_split: float | None = Field(
        None, gt=0, description="hold out this share (< 1) or number (>= 1) of training examples for evaluation"
    )
    max_examples: int | None = Field(None, gt=0, description="train on at most this many examples (a seeded sample)")
    format: DataFormat = Field(DEFAULTS.format, description="record format; auto = detect")
    template: str = Field(
        DEFAULTS.template,
        description="prompt template: auto (the model's chat template, else alpaca), chat, alpaca, hermes "
        "(ChatML with Hermes-style tool calls, for tool-use data), or a path to a Jinja chat template",
    )
    max_length: int = Field(DEFAULTS.max_length, gt=0, description="tokens per example (and per packed row)")
    truncation: Truncation = Field(
        DEFAULTS.truncation,
        description="longer examples: keep_response (cut the prompt's start, keep the last response) or drop",
    )
    train_on_inputs: bool = Field(
        DEFAULTS.train_on_inputs, description="train on the whole sequence, not only the responses"
    )
    batching: Batching = Field(
        "pack", description="pack (whole examples packed into max_length rows) or group (length-grouped padding)"
    )
    columns: dict[str, str | int | list[str | int]] | None = Field(
        None,
        description="CSV/TSV: field -> column name or index, e.g. {label: 0, text: [1, 2]} (joined)",
    )
    header: bool | None = Field(DEFAULTS.header, description="CSV/TSV: first row is a header; null = detect")
    eval_columns: dict[str, str | int | list[str | int]] | None = Field(
        None, description="CSV/TSV: data.columns for the data.eval file, where its layout differs"
    )
    label_names: dict[str | int, str] | None = Field(
        None, description="classify: label as written in the data -> its name, e.g. {1: World, 2: Sports}"
    )
    prompt: str = Field(
        DEFAULTS.prompt,
        description="task with a decoder-only model: the user turn made from each source ({source} is replaced)",
    )
    mix: list[MixSource] = Field(
        [],
        description="sft: more training files mixed into data.train, each with its own eval_split, "
        "max_examples and prompt (e.g. a task's pairs in instruction data: one model for many tasks)",
    )

    def options(self, held_out: bool = False) -> DataOptions:
        """What a file becomes under this section: for the data.eval file (`held_out`), read with
        data.eval_columns where they are given."""
        values = {f.name: getattr(self, f.name) for f in fields(DataOptions)}
        if held_out and self.eval_columns:
            values["columns"] = self.eval_columns
        return DataOptions(**values)


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the adapter input (each LoRA layer keeps a copy of it for backward)"
    )
    target_modules: list[str] = Field(["all-linear"], description="module names, or all-linear")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TuningConfig(Section):
    mode: TuningMode = Field("full", description="which weights train")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="used when mode is lora")
    train_last_layers: int | None = Field(
        None, gt=0, description="mode freeze: train only the last N blocks (and the head)"
    )
    trainable: list[str] = Field([], description="mode freeze: also train parameters whose name matches these patterns")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default depends on tuning.mode")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    layer_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay (e.g. 0.9): the last transformer block "
        "trains at train.lr, each block below at this factor times the one above, the embeddings below them; "
        "the head at train.lr",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep a moving average of the trained weights with this decay (e.g. 0.999): "
        "evaluations, the best checkpoint and final/ use it",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has it, else fp32"
    )
    frozen_weights: Literal["compute", "fp32"] = Field(
        "compute",
        description="the frozen linear weights (LoRA's base, freeze, head) while training under bf16/fp16: "
        "held in that precision (what autocast computes with: the same losses, half their memory, no cast per "
        "micro-batch) or fp32",
    )
    fused_lora: bool = Field(
        True,
        description="LoRA layers computed with one input cast and the low-rank product added inside the matmul, "
        "and under bf16/fp16 q/k/v and gate/up as one layer each (fewer passes over the activations, wider "
        "matmuls; the same model up to bf16 rounding); false: peft's own forward",
    )
    output_gradient: Literal["sampled", "exact"] = Field(
        "sampled",
        description="the hidden states' gradient through a frozen output layer (LoRA, freeze) under bf16 on the CPU: "
        "sampled (every vocabulary column with a probability above 2^-12 exactly, the long tail below it sampled "
        "and rescaled: unbiased, within bf16 rounding of the exact value, a fraction of the output layer's "
        "backward) or exact (every column); fp32, a GPU and a trained output layer are always exact",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="on several processes (torchrun, tunelab train --processes N): ddp (each holds the whole "
        "model; gradients averaged) or fsdp (weights, gradients and optimizer state sharded over the "
        "processes: for models that do not fit one device); one process ignores it",
    )
    seed: int = 42
    log_every: int = Field(10, gt=0, description="steps between train-metric log lines")
    eval_every: int | Literal["epoch"] | None = Field(
        None, description="steps between evaluations, or epoch: at the end of each (and always at the end)"
    )
    save_every: int | Literal["epoch"] | None = Field(
        None, description="steps between checkpoints, or epoch: at the end of each (and always at the end)"
    )
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept (the best one is kept too)")
    patience: int | None = Field(
        None, gt=0, description="early stopping: evaluations without improvement before the run stops"
    )
    best_metric: BestMetric | None = Field(
        None,
        description="what 'best' means for early stopping and the final model; default eval_loss (rlhf: "
        "eval_reward); classify: also eval_macro_f1; task: also eval_rougeL, eval_chrf, ...; reward, dpo: eval_accuracy",
    )

    @field_validator("eval_every", "save_every", mode="before")
    @classmethod
    def _steps_or_epoch(cls, value: Any) -> Any:
        if value is None or value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) > 0:
            return int(value)
        raise ValueError("expected a whole number of steps (at least 1) or epoch")

    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of this scale (alpha / sqrt(tokens x width)) on the input "
        "embeddings while training (Jain et al. 2023; 5 is the paper's usual value); methods sft and task",
    )
    class_weights: Literal["balanced"] | dict[str | int, float] | None = Field(
        None, description="classify: loss weight per class: balanced (inverse frequency) or {label: weight}"
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        [],
        description="trackers that get what metrics.jsonl gets, the config and the summary: tensorboard, "
        "mlflow, wandb, trackio (docs/configs.md#trackers)",
    )


class GenerationConfig(Section):
    """How method task generates when it evaluates (during training and in `tunelab eval`)."""

    max_new_tokens: int = Field(128, gt=0)
    num_beams: int = Field(1, gt=0, description="1 = greedy; more = beam search")
    batch_size: int = Field(16, gt=0, description="sources generated for at once")
    max_examples: int | None = Field(
        200, gt=0, description="evaluation examples generated for during training (all of them at the end)"
    )


class DPOConfig(Section):
    """Method dpo: the preference loss and its strength."""

    loss: Literal["sigmoid", "simpo"] = Field(
        "sigmoid",
        description="sigmoid (DPO, against the reference model) or simpo (reference-free, on the "
        "responses' mean token log-probabilities)",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="the loss's inverse temperature: how far the policy may move from the "
        "reference; default 0.1 for sigmoid, 2.0 for simpo",
    )
    gamma: float = Field(1.0, ge=0, description="simpo: the target reward margin")
    precompute_reference: bool = Field(
        True,
        description="score every pair with the reference model once before training (no reference "
        "forward pass per step); false: score each batch as it comes (the adapter disabled with LoRA, a "
        "frozen copy otherwise)",
    )

    @property
    def strength(self) -> float:
        return self.beta if self.beta is not None else {"sigmoid": 0.1, "simpo": 2.0}[self.loss]


class RLHFConfig(Section):
    """Method rlhf: online RL (RLOO) against a reward model with a KL penalty to the starting policy."""

    reward_model: str | None = Field(
        None,
        description="what scores the responses: a tunelab reward run, a sequence-classifier directory, "
        "or FILE.py:FUNCTION (a Python function (prompts, responses) -> list of numbers)",
    )
    samples_per_prompt: int = Field(4, ge=2, description="responses sampled per prompt (the RLOO group)")
    max_new_tokens: int = Field(64, gt=0, description="longest sampled response")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty: reward - kl_coef * log(pi / pi_ref), per response")
    max_kl: float | None = Field(
        None,
        gt=0,
        description="bound on the held-out KL to the reference (nats per response): an evaluation "
        "over it is never the kept model",
    )
    eval_prompts: int = Field(64, gt=0, description="held-out prompts sampled at each evaluation")


class GRPOConfig(Section):
    """Method grpo: RL with rewards a program computes (GRPO; DAPO's and Dr. GRPO's losses)."""

    rewards: list[str] = Field(
        default_factory=list,
        description="the reward functions, FILE.py:FUNCTION each, called as TRL calls them: "
        "f(prompts=, completions=, completion_ids=, **the prompt's other columns) -> one number (or None) each",
    )
    reward_weights: list[float] | None = Field(None, description="one weight a reward function (default all 1)")
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group G)")
    max_new_tokens: int = Field(128, gt=0, description="longest completion sampled")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions trained on")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="advantages: reward - group mean, divided by the group's std (group), the batch's "
        "(batch), or not divided (none: Dr. GRPO)",
    )
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo",
        description="how the per-token losses are reduced "
        "(docs/preference-alignment.md#grpo-rewards-a-program-computes-method-grpo)",
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="the clip range below 1 (and above, without epsilon_high)")
    epsilon_high: float | None = Field(None, gt=0, description="the clip range above 1 (DAPO's clip-higher: 0.28)")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (the starting policy); 0: none")
    num_iterations: int = Field(
        1, ge=1, description="optimizer steps on each batch of completions (> 1: the clipped ratio matters)"
    )
    mask_truncated: bool = Field(
        False, description="completions cut off at max_new_tokens are not trained on (DAPO's overlong masking)"
    )
    eval_prompts: int = Field(64, gt=0, description="held-out prompts answered (greedy) at each evaluation")


class RunConfig(Section):
    method: MethodName
    model: str = Field(description="a registry name (tunelab models list), a local HF directory or a .gguf file")
    output_dir: str | None = Field(None, description="the run directory; default runs/METHOD-MODEL")
    data: DataConfig
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rlhf: RLHFConfig = Field(default_factory=RLHFConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)

    def split(self) -> Split:
        """How its training records are split (data.eval_split, data.max_examples, train.seed)."""
        from tunelab.data.dataset import Split

        return Split(self.data.eval_split, self.data.max_examples, self.train.seed)

    def files(self) -> Files:
        """Its data files (data.train, data.eval), how each is read, and how they are split."""
        from tunelab.data.dataset import Files

        d = self.data
        return Files(d.train, d.eval, d.options(), d.options(held_out=True), self.split())

    def resolved(self) -> RunConfig:
        """A copy with every default that depends on other keys filled in, as a run will use it."""
        out = self.model_copy(deep=True)
        if out.output_dir is None:
            out.output_dir = f"runs/{out.method}-{Path(out.model).stem}"
        if out.train.lr is None:
            out.train.lr = DEFAULT_LR[out.tuning.mode]
        if out.train.best_metric is None:
            out.train.best_metric = registry.METHODS[out.method].best_metric
        return out


def combination_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Keys that are each valid but do not make sense together, as (key path, message)."""
    problems = []
    tuning = cfg.tuning
    if tuning.mode != "lora" and tuning.lora != LoraConfig():  # the defaults, as a saved config writes them, are fine
        problems.append(("tuning.lora", f"only used with tuning.mode: lora (it is {tuning.mode!r})"))
    uses_freeze_keys = tuning.train_last_layers is not None or tuning.trainable
    if tuning.mode == "freeze" and not uses_freeze_keys:
        problems.append(("tuning.mode", "freeze needs tuning.train_last_layers or tuning.trainable"))
    if tuning.mode != "freeze" and uses_freeze_keys:
        key = "tuning.train_last_layers" if tuning.train_last_layers is not None else "tuning.trainable"
        problems.append((key, f"only used with tuning.mode: freeze (it is {tuning.mode!r})"))
    for key in ("eval_every", "patience"):
        if getattr(cfg.train, key) is not None and cfg.data.eval is None and cfg.data.eval_split is None:
            problems.append((f"train.{key}", "needs an evaluation set: set data.eval or data.eval_split"))
    metrics = registry.METHODS[cfg.method].metrics
    if cfg.train.best_metric is not None and cfg.train.best_metric not in metrics:
        problems.append(("train.best_metric", f"method {cfg.method} computes {', '.join(metrics)}"))
    if cfg.train.class_weights is not None and cfg.method != "classify":
        problems.append(("train.class_weights", f"only used with method: classify (it is {cfg.method!r})"))
    if tuning.mode == "head" and cfg.method != "classify":
        problems.append(("tuning.mode", "head (train only a classification head) needs method: classify"))
    if cfg.data.eval is not None and cfg.data.eval_split is not None:
        problems.append(("data.eval_split", "data.eval already names the evaluation set: use one of the two"))
    if cfg.data.mix and cfg.method != "sft":
        problems.append(("data.mix", f"only used with method: sft (it is {cfg.method!r})"))
    if cfg.train.neftune_alpha is not None and cfg.method not in ("sft", "task"):
        problems.append(("train.neftune_alpha", f"only used with methods sft and task (it is {cfg.method!r})"))
    for section, default in (("dpo", DPOConfig()), ("rlhf", RLHFConfig()), ("grpo", GRPOConfig())):
        if cfg.method != section and getattr(cfg, section) != default:
            problems.append((section, f"only used with method: {section} (it is {cfg.method!r})"))
    if cfg.method == "rlhf" and cfg.rlhf.reward_model is None:
        problems.append(
            (
                "rlhf.reward_model",
                "method rlhf needs a reward model (a reward run, a sequence classifier, or FILE.py:FUNCTION)",
            )
        )
    if cfg.method == "grpo":
        problems += _grpo_problems(cfg.grpo, cfg.train)
    return problems


def _grpo_problems(grpo: GRPOConfig, train: TrainConfig) -> list[tuple[str, str]]:
    problems = []
    if grpo.num_iterations > 1 and isinstance(train.save_every, int) and train.save_every % grpo.num_iterations:
        problems.append(
            (
                "train.save_every",
                f"a multiple of grpo.num_iterations ({grpo.num_iterations}): a checkpoint between two steps on "
                "the same completions could not resume exactly",
            )
        )
    if not grpo.rewards:
        problems.append(("grpo.rewards", "method grpo needs reward functions: a list of FILE.py:FUNCTION"))
    for i, spec in enumerate(grpo.rewards):
        path, colon, name = spec.rpartition(":")
        if not colon or not path.endswith(".py") or not name.isidentifier():
            problems.append((f"grpo.rewards[{i}]", f"expected FILE.py:FUNCTION, got {spec!r}"))
    if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.rewards):
        problems.append(
            (
                "grpo.reward_weights",
                f"one weight a reward function: {len(grpo.rewards)} functions, {len(grpo.reward_weights)} weights",
            )
        )
    return problems


# --- reading -------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, validate everything at once."""
    raw, sources, problems = read_yaml_with_overrides(path, overrides)
    return validate_run(raw, sources, Path(path), problems)


def read_yaml_with_overrides(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, dict[str, str], list[str]]:
    """(the mapping with the overrides applied, where each dotted key came from, override problems)."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    problems = []
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(f"command line: {problem}")
    sources = {key: f"{path}:{line}" for key, line in lines.items()}
    for item in overrides:
        parts = item.partition("=")[0].strip().split(".")
        for i in range(1, len(parts)):
            sources.setdefault(".".join(parts[:i]), "command line")  # a section the file lacks
        sources[".".join(parts)] = "command line"
    return raw, sources, problems


def validate_run(
    raw: dict, sources: dict[str, str], path: Path, problems: Sequence[str] = (), prefix: str = ""
) -> RunConfig:
    """A RunConfig from `raw`, or one UserError naming every problem by its line (keys under `prefix`)."""
    problems = list(problems)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        problems += [_where(prefix + key, sources, path) + msg for key, msg in _describe(e)]
        raise UserError(*problems) from None
    problems += [_where(prefix + key, sources, path) + msg for key, msg in combination_problems(cfg)]
    if problems:
        raise UserError(*problems)
    return cfg


def validate_schema(
    schema: type[BaseModel], raw: dict, sources: dict[str, str], path: Path, problems: Sequence[str] = ()
):
    """`schema` from `raw` (another file's schema, e.g. an experiment), with the same error messages."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UserError(*problems, *[_where(key, sources, path) + msg for key, msg in _describe(e, schema)]) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """The mapping in the file, and the line of every key in it (by dotted path)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config file ({e})") from None
    loader = yaml.SafeLoader(text)  # one parse gives both the node tree (for lines) and the values
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level, got {_kind(data)}")
    return data, _key_lines(node)


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def apply_override(raw: dict, item: str) -> str | None:
    """Set `a.b.c=value` in `raw` (the value parsed as YAML). Returns a problem, or None."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        return f"{item!r}: expected key=value, e.g. train.lr=1e-4"
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: keep the text, and let the schema judge it
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section"
        node = child
    node[parts[-1]] = value
    return None


def _where(key: str, sources: dict[str, str], path: Path) -> str:
    # The key's own line; else the nearest section that has one (a missing key sits in its section).
    probe = key
    while probe:
        if probe in sources:
            return f"{sources[probe]}: {key}: "
        probe = probe.rpartition(".")[0]
    return f"{path}: {key}: "


# --- error messages in the user's terms ----------------------------------------------------------

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping (a section of keys)",
    "model": "a mapping (a section of keys)",
}


def _describe(error: ValidationError, root: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in e["loc"]), _message(e, root or RunConfig)) for e in error.errors()]


def _message(e: Mapping[str, Any], root: type[BaseModel]) -> str:
    kind, value = e["type"], e.get("input")
    loc = tuple(str(p) for p in e["loc"])
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key" + _suggest_key(loc, root)
    if kind == "literal_error":
        choices = _choices_at(loc, root)
        hint = difflib.get_close_matches(str(value), choices, n=1)
        return f"{value!r} is not one of: {', '.join(choices)}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    base = kind.split("_")[0]
    if base in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float", "fraction")):
        return f"expected {_EXPECTED[base]}, got {_show(value)}"
    return f"{e['msg'].replace('Input should be', 'must be').removeprefix('Value error, ')}, got {_show(value)}"


def _show(value: Any) -> str:
    return f"{_kind(value)} {value!r}" if isinstance(value, (dict, list)) else repr(value)


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _section_at(loc: tuple[str, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The schema class of the section that holds `loc[-1]`."""
    model: type[BaseModel] = root or RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


def _choices_at(loc: tuple[str, ...], root: type[BaseModel] | None = None) -> list[str]:
    model = _section_at(loc, root)
    field = model.model_fields[loc[-1]] if model else None
    return [str(c) for c in getattr(field.annotation, "__args__", ())] if field else []


def _walk(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """(dotted key, field, is_section) for every key of the schema, depth first."""
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield prefix + name, field, True
            yield from _walk(sub, f"{prefix}{name}.")
        else:
            yield prefix + name, field, False


def all_keys(root: type[BaseModel] | None = None) -> list[str]:
    """Every dotted key of the schema, sections included."""
    return [key for key, _, _ in _walk(root or RunConfig)]


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every value key: what `tunelab config keys` prints."""
    rows = []
    for key, field, section in _walk():
        if not section:
            default = "(required)" if field.is_required() else _yaml_value(field.get_default(call_default_factory=True))
            rows.append((key, _type_name(field.annotation), default, field.description or ""))
    return rows


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    names = {int: "integer", float: "number", str: "string", bool: "true/false", type(None): "null"}
    return names.get(annotation, str(annotation))


def _suggest_key(loc: tuple[str, ...], root: type[BaseModel] | None = None) -> str:
    """`; did you mean 'train.lr'?`: a near name in the same section, else the same name elsewhere."""
    name, parent = loc[-1], loc[:-1]
    section = _section_at(loc, root)
    siblings = list(section.model_fields) if section else []
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join(parent + (close[0],))!r}?"
    keys = all_keys(root)
    elsewhere = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if not elsewhere:
        elsewhere = difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
    return f"; did you mean {elsewhere[0]!r}?" if elsewhere else ""
