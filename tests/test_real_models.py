"""The real pretrained models of the registry, from their PyPI packages.

The first run imports each GGUF into the tunelab cache (about 40 s for SmolLM2, 100 s for Gemma-3);
later runs reuse it. These tests load what the import wrote with plain transformers, as a user would.
"""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from tunelab.models import REGISTRY, pull
from tunelab.models.gguf import MARKER

pytestmark = [pytest.mark.real, pytest.mark.slow]


def greedy_reply(folder, question: str, max_new_tokens: int = 24) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def mean_nll(folder, text: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_smollm2_answers_with_plain_transformers():
    folder = pull("smollm2-135m-instruct")
    assert (folder / MARKER).exists() and "quantization_config" not in (folder / "config.json").read_text()
    assert AutoTokenizer.from_pretrained(folder).chat_template  # the instruct model's template came along
    assert "Paris" in greedy_reply(folder, "What is the capital of France?")


def test_gemma3_base_is_a_sound_language_model():
    folder = pull("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template is None  # a base model: instruction-tuning starts from scratch
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id  # Gemma needs its <bos>
    # A broken de-quantization (wrong norms, wrong layout) gives a loss near log(vocab) ~ 12 or worse.
    assert mean_nll(folder, "The quick brown fox jumps over the lazy dog. Paris is the capital of France.") < 4.0


def test_minilm_is_an_encoder_used_where_it_lies():
    folder = pull("minilm-l6")
    assert folder == REGISTRY["minilm-l6"].package_dir() / "model"
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "bert"
    batch = tokenizer(
        ["A man is eating food.", "A man eats a meal.", "The stock market fell."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3  # paraphrases are close, unrelated text is not


def test_cli_pull_prints_the_directory_last_and_is_instant_the_second_time():
    pull("smollm2-135m-instruct")
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "models", "pull", "smollm2-135m-instruct"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(pull("smollm2-135m-instruct"))
    assert "Importing" not in proc.stderr  # nothing was imported again


def test_cli_generate_streams_a_reply():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "generate",
            "smollm2-135m-instruct",
            "What is the capital of France?",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_smollm2_answers_beside_others_as_alone_in_fp32():
    """The continuous batcher on the real model in fp32: rows that join and leave a left-padded batch write
    transformers' `generate` answers token for token. (In bf16 a padded row rounds differently and greedy
    answers part after a few tokens: docs/serving.md, precision.)"""
    from tunelab.infer.decode import Row, run_to_end
    from tunelab.infer.sampling import Sampling

    folder = pull("smollm2-135m-instruct")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    questions = [
        "Give three tips for staying healthy.",
        "What is the capital of France?",
        "Describe the water cycle in two sentences for a ten-year-old reader.",
        "Name a prime number.",
        "Write a haiku about autumn leaves falling on a quiet pond.",
        "How do vaccines work?",
    ]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for q in questions
    ]
    alone = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        alone.append([t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eos_token_id])
    stop = {tokenizer.eos_token_id}
    rows = [Row(i, p, Sampling(max_tokens=16, temperature=0.0), tokenizer, stop) for i, p in enumerate(prompts)]
    run_to_end(model, rows, max_rows=3)  # three at a time: rows join as others leave, prompts of other lengths
    assert [row.tokens for row in rows] == alone
