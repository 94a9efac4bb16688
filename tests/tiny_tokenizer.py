"""Tiny fast tokenizers built in memory (a byte-level BPE of ~400 tokens): no files, milliseconds.

`chat_tokenizer()` behaves like SmolLM2's (ChatML template, <|im_end|> as EOS, no BOS added);
`base_tokenizer()` like Gemma-3 base (no chat template, BOS added to every text, <eos>).
"""

from __future__ import annotations

from functools import cache

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "And of Spain? Madrid. Germany? Berlin. Be brief, please answer in one word.",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Summarize the following text. Translate into German: the cat sat on the mat.",
    "system user assistant Instruction Response ### Hello Hi there, how can I help you today?",
] * 5


@cache
def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def chat_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe()), bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tok.chat_template = CHATML
    return tok


def base_tokenizer():
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_bpe())
    bos = raw.token_to_id("<bos>")
    raw.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
