"""The built-in demo task: two-digit addition ("07+45=" -> 52) with an exact reward on the last
integer of the response, and the character-level tokenizer the demo model uses.

Operands are zero-padded to a fixed width so every prompt has the same length; the answer is the
integer sum. A response may show its work before the answer (``worked_answer``: the ones column,
then the tens column with its carry, then the sum); the reward reads only the last integer.
A fifth of the operand pairs, chosen by a hash (``is_heldout``), is held out: never in warm-start
training nor in the RL prompts, only in the evaluation set.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus newline: enough for prompts, chat templates and tests, one token per char.
CHARS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
# A pair is held out when a multiplicative hash of (a, b) is 0 modulo HELDOUT_EVERY: one pair in
# five, spread over every digit (a plain modulus would hold out whole ones digits of b).
HELDOUT_EVERY = 5
_HASH = 2654435761  # Knuth's multiplicative hash constant
_INTEGER = re.compile(r"-?\d+")


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character (BOS prepended, no spaces added
    on decode: the ``Fuse`` decoder joins tokens as they are)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def save_char_tokenizer(out_dir: str | Path):
    """Write the char tokenizer's files into ``out_dir``; return the tokenizer.

    Load it back with ``PreTrainedTokenizerFast.from_pretrained`` (or ``AutoTokenizer`` beside a
    llama-typed config; a qwen2-typed config makes ``AutoTokenizer`` rebuild it wrongly)."""
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    # Name the class, so loaders that read tokenizer_config.json pick the fast tokenizer as is.
    cfg_path = Path(out_dir, "tokenizer_config.json")
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return tokenizer


def is_heldout(a: int, b: int, digits: int = 2) -> bool:
    """Whether the pair (a, b) belongs to the held-out split (never seen in warm-start training
    or in the RL prompts): one pair in ``HELDOUT_EVERY``, by a hash of the pair."""
    return (a * 10**digits + b) * _HASH % 2**32 % HELDOUT_EVERY == 0


def worked_answer(a: int, b: int) -> str:
    """The sum with its working shown, column by column: ``[7+8=15,5+6+1=12]125`` for 57+68
    (ones column, then tens column plus the carry, then the sum; two-digit operands)."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    return f"[{a % 10}+{b % 10}={ones},{a // 10}+{b // 10}+{carry}={tens}]{a + b}"


def toy_prompt(a: int, b: int, digits: int = 2) -> str:
    """The prompt text for a + b: zero-padded operands, then ``=``."""
    return f"{a:0{digits}d}+{b:0{digits}d}="


def generate_toy_dataset(
    n: int, seed: int, digits: int = 2, split: str = "all"
) -> list[dict]:
    """``n`` addition rows ``{prompt, answer, domain}`` drawn with ``seed`` (pairs may repeat;
    ``answer`` is the integer sum).

    ``split``: "all", "train" (pairs not held out) or "heldout". ``domain`` is "carry" when the
    ones digits carry, else "nocarry", so group-robust losses have two real groups."""
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng = random.Random(seed)
    hi = 10**digits - 1
    rows = []
    while len(rows) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if split != "all" and is_heldout(a, b, digits) != (split == "heldout"):
            continue
        domain = "carry" if a % 10 + b % 10 >= 10 else "nocarry"
        rows.append({"prompt": toy_prompt(a, b, digits), "answer": a + b, "domain": domain})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON lines, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several ranks may write at once
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (an optional minus sign, then digits), or None."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def toy_reward(response_text: str, answer: str | int) -> float:
    """1.0 when the last integer of the response equals ``answer``, else 0.0 (work shown before
    the answer is allowed; an answer that is not an integer scores 0)."""
    try:
        expected = int(str(answer).strip())
    except ValueError:
        return 0.0
    return float(last_integer(response_text) == expected)
