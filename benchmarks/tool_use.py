"""Tool use, measured: a function-calling task built from ../shared/data, and a model before and after
fine-tuning on it.

    .venv/bin/python benchmarks/tool_use.py build [--out data/tool-use]
    .venv/bin/python benchmarks/tool_use.py measure [--config configs/tools-smollm2.yaml]

`build` writes train.jsonl and test.jsonl (OpenAI's fine-tuning rows with `tools`) from real data; the
rows are derived, so they are built here rather than kept in the repository. Three tools, each filled
from a dataset's own fields, and instructions that no tool fits:

    translate(text, target_language)    Multi30K captions, English->German or German->English; the
                                        caption is `text`, the tool's result is the reference translation
    file_story(section, headline)       AG News: the headline is `headline`, its class the `section`
    log_review(sentiment)               SST-2 film reviews: the label is the `sentiment`
    (no tool)                           Alpaca instructions, answered in text with Alpaca's output

Each tool row is a user request, the assistant's call, the tool's result and the assistant's answer
(so both turns are trained and scored: the call, and the text after the result). Train and test come
from disjoint parts of each source (Multi30K train / test_2016_flickr, SST-2 train / dev, AG News and
Alpaca split by row), a fixed seed.

`measure` builds the data, scores the base model (`tunelab eval MODEL --config CONFIG --data test`,
asked through the config's template), trains the config (`tunelab train`), scores the run, and prints a
Markdown table: full-call exact match with its 95% bootstrap interval, function accuracy, argument
exact match, missed / false / malformed call rates, the paired-bootstrap difference, and the training
time. Everything runs through the `tunelab` command, as a user would.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SECTIONS = ["World", "Sports", "Business", "Sci/Tech"]
SIZES = {"train": {"translate": 80, "file_story": 80, "log_review": 50, "text": 50}}
SIZES["test"] = {"translate": 40, "file_story": 40, "log_review": 30, "text": 30}


def _tool(name: str, description: str, properties: dict) -> dict:
    parameters = {"type": "object", "properties": properties, "required": list(properties)}
    parameters["additionalProperties"] = False
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _tool(
        "translate",
        "Translate a text into another language",
        {
            "text": {"type": "string", "description": "the text to translate, exactly as given"},
            "target_language": {"type": "string", "enum": ["German", "English"]},
        },
    ),
    _tool(
        "file_story",
        "File a news story under its section of the paper",
        {"section": {"type": "string", "enum": SECTIONS}, "headline": {"type": "string"}},
    ),
    _tool(
        "log_review",
        "Record the sentiment of a film review",
        {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
    ),
]
ASK = {
    "German": ["Translate into German: {}", "How do you say this in German? {}", 'Please put this into German: "{}"'],
    "English": ["Translate into English: {}", "What does this mean in English? {}", 'English, please: "{}"'],
    "file_story": ["File this story in the right section: {}", "Which section does this go in? Please file it. {}"],
    "log_review": ["Log the sentiment of this review: {}", 'A viewer wrote: "{}" Please record how they felt.'],
}


def _conversation(user: str, name: str, arguments: dict, result: dict, answer: str) -> dict:
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result, ensure_ascii=False)},
        {"role": "assistant", "content": answer},
    ]
    return {"tools": TOOLS, "parallel_tool_calls": False, "messages": messages}


def _lines(name: str) -> list[str]:
    with gzip.open(DATA / "translate" / "multi30k-en-de" / name, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f]


def _translations(rng: random.Random, split: str, n: int) -> list[dict]:
    stem = "train" if split == "train" else "test_2016_flickr"
    en, de = _lines(f"{stem}.en.gz"), _lines(f"{stem}.de.gz")
    rows = []
    for i in rng.sample(range(len(en)), n):
        source, target, language = (en[i], de[i], "German") if rng.random() < 0.5 else (de[i], en[i], "English")
        arguments = {"text": source, "target_language": language}
        user = rng.choice(ASK[language]).format(source)
        rows.append(_conversation(user, "translate", arguments, {"translation": target}, target))
    return rows


def _stories(rng: random.Random, stories: list[tuple[str, str, str]]) -> list[dict]:
    rows = []
    for label, title, description in stories:
        arguments = {"section": SECTIONS[int(label) - 1], "headline": title}
        user = rng.choice(ASK["file_story"]).format(f"{title}. {description}")
        answer = f"Filed under {arguments['section']}: {title}"
        rows.append(_conversation(user, "file_story", arguments, {"filed": True}, answer))
    return rows


def _reviews(rng: random.Random, split: str, n: int) -> list[dict]:
    name = "train.tsv" if split == "train" else "dev.tsv"
    with open(DATA / "classify" / "sst2" / name, encoding="utf-8") as f:
        reviews = [r for r in csv.DictReader(f, delimiter="\t") if len(r["sentence"].split()) >= 8]
    rows = []
    for review in rng.sample(reviews, n):
        sentiment = "positive" if review["label"] == "1" else "negative"
        user = rng.choice(ASK["log_review"]).format(review["sentence"].strip())
        answer = f"Logged: the review is {sentiment}."
        rows.append(_conversation(user, "log_review", {"sentiment": sentiment}, {"logged": True}, answer))
    return rows


def _answers(instructions: list[dict]) -> list[dict]:
    rows = []
    for r in instructions:
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        rows.append({"tools": TOOLS, "messages": messages})
    return rows


def build(out: Path) -> dict[str, int]:
    """Write out/train.jsonl and out/test.jsonl; {file name: rows}."""
    rng = random.Random(0)
    with open(DATA / "classify" / "ag_news" / "test.csv", encoding="utf-8") as f:
        news = [(r[0], r[1].strip(), r[2].strip().replace("\\", " ")) for r in csv.reader(f)]
    rng.shuffle(news)
    alpaca = json.loads((DATA / "instruct" / "alpaca_5000.json").read_text(encoding="utf-8"))
    # No tool fits these: short answers, nothing about translating, filing or reviewing.
    words = ("translat", "german", "news", "review", "sentiment", "headline")
    alpaca = [r for r in alpaca if len(r["output"]) < 300 and not any(w in str(r).lower() for w in words)]
    rng.shuffle(alpaca)
    rows, used = {}, {"news": 0, "alpaca": 0}
    for split, n in SIZES.items():
        stories = news[used["news"] : used["news"] + n["file_story"]]
        instructions = alpaca[used["alpaca"] : used["alpaca"] + n["text"]]
        used["news"] += n["file_story"]
        used["alpaca"] += n["text"]
        rows[split] = (
            _translations(rng, split, n["translate"])
            + _stories(rng, stories)
            + _reviews(rng, split, n["log_review"])
            + _answers(instructions)
        )
        rng.shuffle(rows[split])
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, split_rows in rows.items():
        path = out / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows), encoding="utf-8")
        tmp.replace(path)
        written[path.name] = len(split_rows)
    return written


def _tunelab(*args: str) -> float:
    """Run `tunelab ARGS` as a user would; its wall time in seconds."""
    print("$ tunelab", " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=ROOT, check=True)
    return time.perf_counter() - started


def measure(config: Path, out: Path, max_new_tokens: int) -> None:
    import yaml

    from tunelab.eval.stats import paired_bootstrap
    from tunelab.eval.tool_calls import per_turn_rows

    print(build(out))
    cfg = yaml.safe_load(config.read_text())
    run, test = ROOT / cfg["output_dir"], out / "test.jsonl"
    scored = {"before": out / f"eval-{cfg['model']}.json", "after": out / "eval-tuned.json"}
    flags = ["--data", str(test), "--max-new-tokens", str(max_new_tokens), "--force"]
    seconds = {"before": _tunelab("eval", cfg["model"], *flags, "--out", str(scored["before"]))}
    if not (run / "final").exists():
        seconds["train"] = _tunelab("train", str(config))
    seconds["after"] = _tunelab("eval", str(run), *flags, "--out", str(scored["after"]))
    metrics = {k: json.loads(p.read_text())["metrics"] for k, p in scored.items()}
    turns = {
        k: per_turn_rows([json.loads(line) for line in p.with_suffix(".predictions.jsonl").read_text().splitlines()])
        for k, p in scored.items()
    }
    difference = paired_bootstrap(*(([r["full_call_exact_match"] for r in turns[k]]) for k in ("after", "before")))
    summary = json.loads((run / "summary.json").read_text())
    result = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "model": cfg["model"],
        "sizes": SIZES,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "summary": {k: summary.get(k) for k in ("train_seconds", "train_examples", "steps", "final_eval_loss")},
        "before": metrics["before"],
        "after": metrics["after"],
        "difference": difference,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| {cfg['model']} on {test.name} | before | after |\n|---|---|---|")
    for key in ("full_call_exact_match", "function_accuracy", "arguments_exact_match", "missed_call_rate"):
        print(f"| {key} | {metrics['before'][key]} | {metrics['after'][key]} |")
    for key in ("false_call_rate", "malformed_rate", "full_call_exact_match_interval"):
        print(f"| {key} | {metrics['before'][key]} | {metrics['after'][key]} |")
    print(f"\npaired difference (after - before): {difference}\n{json.dumps(result['seconds'])} s, {result['machine']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "measure"))
    parser.add_argument("--out", default="data/tool-use", help="where the rows go (relative to the repository)")
    parser.add_argument("--config", default="configs/tools-smollm2.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per answer")
    args = parser.parse_args()
    out = ROOT / args.out
    if args.step == "build":
        print(build(out))
    else:
        measure(ROOT / args.config, out, args.max_new_tokens)


if __name__ == "__main__":
    main()
