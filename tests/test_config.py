import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import run_cli

from tunelab.config import DEFAULT_LR, RunConfig, all_keys, dump_config, load_config
from tunelab.errors import UserError

GOOD = """\
method: sft
model: smollm2-135m-instruct
data:
  train: ../shared/data/instruct/alpaca_5000.json
  max_length: 512
tuning:
  mode: lora
  lora:
    r: 8
train:
  batch_size: 4
  lr: 1e-4
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path, overrides=()):
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return info.value.problems


def test_good_config_loads_with_types_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.method == "sft" and cfg.tuning.mode == "lora" and cfg.tuning.lora.r == 8
    assert cfg.train.lr == 1e-4  # YAML reads 1e-4 as a string; the schema makes it a number
    assert cfg.data.max_length == 512 and cfg.train.grad_accum == 1 and cfg.data.format == "auto"


def test_resolved_fills_defaults_that_depend_on_other_keys(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD.replace("mode: lora\n  lora:\n    r: 8\n", "mode: full\n")), ["train.lr=null"]
    )
    resolved = cfg.resolved()
    assert resolved.train.lr == DEFAULT_LR["full"]
    assert resolved.output_dir == "runs/sft-smollm2-135m-instruct"
    assert cfg.train.lr is None  # the loaded config itself is untouched


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD),
        [
            "train.lr=3e-4",
            "data.max_length=256",
            "tuning.lora.target_modules=[q_proj, v_proj]",
            "data.eval=held.jsonl",
            "output_dir=runs/x",
            "train.max_steps=5",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.data.max_length == 256
    assert cfg.tuning.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval == "held.jsonl" and cfg.output_dir == "runs/x" and cfg.train.max_steps == 5


def test_three_mistakes_are_reported_together_with_key_paths_and_lines(tmp_path):
    path = write(
        tmp_path,
        GOOD.replace("batch_size: 4", "batch_size: four")
        .replace("mode: lora", "mode: lorra")
        .replace("lr: 1e-4", "lrr: 1e-4"),
    )
    found = problems(path)
    assert len(found) == 3, found
    assert f"{path}:7: tuning.mode: 'lorra' is not one of: full, lora, freeze, head; did you mean 'lora'?" in found
    assert f"{path}:11: train.batch_size: expected an integer, got 'four'" in found
    assert f"{path}:12: train.lrr: unknown key; did you mean 'train.lr'?" in found


def test_cli_train_reports_all_problems_and_exits_1_without_traceback(tmp_path):
    path = write(
        tmp_path,
        GOOD.replace("batch_size: 4", "batch_size: four")
        .replace("mode: lora", "mode: lorra")
        .replace("lr: 1e-4", "lrr: 1e-4"),
    )
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), proc.stderr
    assert "tuning.mode" in proc.stderr and "train.batch_size" in proc.stderr and "train.lrr" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr: 1e-4\n", "lr: unknown key; did you mean 'train.lr'?"),  # right name, wrong section
        ("trian:\n  lr: 1e-4\n", "trian: unknown key; did you mean 'train'?"),
        ("data:\n  train: x\n  max_lenght: 8\n", "data.max_lenght: unknown key; did you mean 'data.max_length'?"),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(tmp_path, text, expected):
    base = "method: sft\nmodel: m\n" + ("" if text.startswith("data") else "data:\n  train: x\n")
    found = problems(write(tmp_path, base + text))
    assert any(p.endswith(expected) for p in found), found


def test_missing_required_keys_are_named(tmp_path):
    found = problems(write(tmp_path, "tuning:\n  mode: full\n"))
    assert {p.split(": ", 1)[1] for p in found} == {
        "method: required key is missing",
        "model: required key is missing",
        "data: required key is missing",
    }
    found = problems(write(tmp_path, "method: sft\nmodel: m\ndata:\n  eval: e.jsonl\n"))
    assert found == [f"{tmp_path / 'cfg.yaml'}:3: data.train: required key is missing"]


def test_bounds_and_section_types(tmp_path):
    found = problems(write(tmp_path, GOOD), ["data.max_length=0", "train=5", "tuning.lora.dropout=1.5"])
    assert "command line: data.max_length: must be greater than 0, got 0" in found
    assert "command line: train: expected a mapping (a section of keys), got 5" in found
    assert "command line: tuning.lora.dropout: must be less than 1, got 1.5" in found
    assert len(found) == 3, found


def test_override_mistakes_are_reported(tmp_path):
    found = problems(write(tmp_path, GOOD), ["train.lr", "model.name=x", "train.epochs=many"])
    assert "command line: 'train.lr': expected key=value, e.g. train.lr=1e-4" in found
    assert "command line: model.name: model is a value, not a section" in found
    assert "command line: train.epochs: expected a number, got 'many'" in found


def test_bad_combinations_are_reported_together(tmp_path):
    text = GOOD.replace("mode: lora", "mode: full") + "  eval_every: 50\n"
    found = problems(write(tmp_path, text))
    assert any("tuning.lora: only used with tuning.mode: lora (it is 'full')" in p for p in found)
    assert any("train.eval_every: needs an evaluation set: set data.eval or data.eval_split" in p for p in found)
    no_lora = write(tmp_path, GOOD.replace("mode: lora\n  lora:\n    r: 8\n", "mode: full\n"))
    found = problems(no_lora, ["tuning.mode=freeze"])
    assert any("tuning.mode: freeze needs tuning.train_last_layers or tuning.trainable" in p for p in found)
    found = problems(no_lora, ["tuning.train_last_layers=2"])
    assert any("tuning.train_last_layers: only used with tuning.mode: freeze (it is 'full')" in p for p in found)
    cfg = load_config(no_lora, ["tuning.mode=freeze", "tuning.train_last_layers=2"])
    assert cfg.tuning.train_last_layers == 2
    assert (
        load_config(no_lora, ["method=task", "train.neftune_alpha=5"]).train.neftune_alpha == 5
    )  # a language model too
    found = problems(no_lora, ["method=dpo", "train.neftune_alpha=5"])
    assert any("train.neftune_alpha: only used with methods sft and task (it is 'dpo')" in p for p in found)
    mix = write(
        tmp_path,
        GOOD.replace(
            "  max_length: 512\n",
            "  max_length: 512\n  mix:\n    - {train: pairs.jsonl, max_examples: 10, eval_split: 2}\n",
        ),
        "mix.yaml",
    )
    assert load_config(mix).data.mix[0].max_examples == 10
    assert any("data.mix: only used with method: sft (it is 'task')" in p for p in problems(mix, ["method=task"]))
    bad = write(
        tmp_path,
        GOOD.replace("  max_length: 512\n", "  max_length: 512\n  mix:\n    - {path: p.jsonl}\n"),
        "bad-mix.yaml",
    )
    assert any("data.mix.0" in p for p in problems(bad))


def test_invalid_yaml_names_the_line(tmp_path):
    found = problems(write(tmp_path, "method: sft\nmodel: [unclosed\ndata:\n  train: x\n"))
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'cfg.yaml'}:") and "invalid YAML" in found[0]
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such config file"]
    assert "expected a mapping" in problems(write(tmp_path, "- a\n- b\n"))[0]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.seed=7"]).resolved()
    again = load_config(write(tmp_path, dump_config(cfg), "resolved.yaml"))
    assert again == cfg
    code, out, err = run_cli(
        "config", "show", str(tmp_path / "cfg.yaml"), "train.seed=7", "--out", str(tmp_path / "o.yaml")
    )
    assert code == 0, err
    assert RunConfig.model_validate(yaml.safe_load((tmp_path / "o.yaml").read_text())) == cfg
    assert yaml.safe_load(out) == cfg.model_dump(mode="json")


def test_schema_has_the_agreed_core_key_names():
    agreed = [
        "method",
        "model",
        "output_dir",
        "data.train",
        "data.eval",
        "data.format",
        "data.template",
        "data.max_length",
        "tuning.mode",
        "train.epochs",
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.seed",
        "train.log_every",
        "train.eval_every",
        "train.save_every",
    ]
    assert set(agreed) <= set(all_keys())
    code, out, _ = run_cli("config", "keys")
    assert code == 0 and all(any(line.startswith(key + " ") for line in out.splitlines()) for key in agreed)


def test_cli_basics(tmp_path):
    from tunelab import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"tunelab {__version__}"
    code, out, _ = run_cli("--help")
    assert code == 0 and "models" in out and "train" in out
    code, out, err = run_cli("train", str(write(tmp_path, GOOD)), "--dry-run")
    assert code == 0 and yaml.safe_load(out)["train"]["lr"] == 1e-4


def test_the_schema_takes_its_methods_and_metrics_from_the_registry(tmp_path):
    from tunelab import recipes

    config = tmp_path / "c.yaml"
    config.write_text("method: sft\nmodel: m\ndata: {train: x.jsonl}\ntrain: {best_metric: eval_reward}\n")
    code, _, err = run_cli("train", str(config), "--dry-run")
    assert code != 0 and "train.best_metric: method sft computes eval_loss, eval_accuracy" in err
    for name, method in recipes.METHODS.items():
        cfg = RunConfig.model_validate({"method": name, "model": "m", "data": {"train": "x"}}).resolved()
        assert cfg.train.best_metric == method.metrics[0]
    code, _, err = run_cli("train", str(config), "method=distill", "--dry-run")
    assert "'distill' is not one of: " + ", ".join(recipes.METHODS) in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError):
        run_cli("--debug", "train", str(tmp_path / "missing.yaml"))


def test_problems_are_traced_to_the_file_or_the_command_line(tmp_path):
    path = write(tmp_path, "method: sft\nmodel: m\ndata:\n  eval: e.jsonl\n")
    found = problems(path, ["data.max_length=x", "train.lr=fast"])
    assert f"{path}:3: data.train: required key is missing" in found  # the file's section, not the override
    assert "command line: data.max_length: expected an integer, got 'x'" in found
    assert "command line: train.lr: expected a number, got 'fast'" in found
