"""The built-in demo task: two-digit addition ("07+45=" -> "52") with an exact, partial-credit
reward, and the character-level tokenizer the demo model uses.

Operands are zero-padded to a fixed width so every prompt has the same length; the answer is the
plain sum. A tiny model warm-started briefly gets some digits right, so the reward is dense enough
for RL to lift within minutes on CPU (see ``tools/make_demo_model.py``).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus newline: enough for prompts, chat templates and tests, one token per char.
CHARS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
# A row's pair is held out from warm-start training when (a * 10**digits + b) % HELDOUT_EVERY == 0.
HELDOUT_EVERY = 5
EXACT_BONUS = 0.5


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
    """Whether the pair (a, b) belongs to the held-out split (never seen in warm-start training)."""
    return (a * 10**digits + b) % HELDOUT_EVERY == 0


def toy_prompt(a: int, b: int, digits: int = 2) -> str:
    """The prompt text for a + b: zero-padded operands, then ``=``."""
    return f"{a:0{digits}d}+{b:0{digits}d}="


def generate_toy_dataset(
    n: int, seed: int, digits: int = 2, split: str = "all"
) -> list[dict[str, str]]:
    """``n`` addition rows ``{prompt, answer, domain}`` drawn with ``seed`` (pairs may repeat).

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
        rows.append({"prompt": toy_prompt(a, b, digits), "answer": str(a + b), "domain": domain})
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


def toy_reward(response_text: str, answer: str) -> float:
    """Exact reward in [0, 1]: 1 for the exact answer, else ``EXACT_BONUS`` times the fraction of
    positions (left-aligned, over the longer string) that match.

    Surrounding whitespace is ignored; anything else extra costs credit."""
    response, answer = response_text.strip(), str(answer).strip()
    if response == answer:
        return 1.0
    width = max(len(response), len(answer))
    hits = sum(r == a for r, a in zip(response, answer, strict=False))
    return EXACT_BONUS * hits / width
