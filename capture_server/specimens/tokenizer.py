"""A byte-level BPE tokenizer trained offline on a small built-in corpus."""

from __future__ import annotations

import random
from pathlib import Path

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TOPICS = {
    "math": "the sum of two primes is even and the integral of x is half x squared",
    "code": "def main return value for loop in range print the list and sort the keys of a dict",
    "history": "the empire fell after the war and the king signed a treaty with the north",
    "biology": "the cell divides and the protein folds while enzymes bind to the membrane receptor",
    "finance": "the bank raised interest rates and the market priced bonds against inflation risk",
}


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic training text: shuffled topic words, digits and punctuation."""
    rng = random.Random(seed)
    words = [w for text in _TOPICS.values() for w in text.split()]
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 16)
        line = " ".join(rng.choice(words) for _ in range(k))
        lines.append(line + rng.choice([".", "?", "!", f" {rng.randint(0, 999)}."]))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE and save it as a `PreTrainedTokenizerFast` into `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast
