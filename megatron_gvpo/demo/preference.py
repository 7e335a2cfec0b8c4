"""The preference demo: pairs over the addition task, in two domains of very different sizes.

- ``majority`` (90%): prompts ``aa+bb=`` with a first operand of 10..99; the correct sum is chosen
  over the sum plus one.
- ``minority`` (10%): first operand 0..9 (the prompt starts with ``0``); these raters prefer the
  sum plus one over the correct sum: the opposite of the majority, and of the warm-started model.

A model can tell the domains apart from the prompt, but a uniform objective spends 90% of its
gradient on the majority's rule, which carries over to the minority's prompts; Group-Robust PO
raises the weight of whichever domain has the larger loss. Held-out pairs (operand pairs whose
second operand is a multiple of 5, ``heldout_pair``; never in the training file) measure each
domain's preference accuracy.
"""

from __future__ import annotations

import random
from pathlib import Path

from megatron_gvpo.demo.task import toy_prompt, write_jsonl

MINORITY_SHARE = 0.1
EVAL_SHARE = 0.2  # eval pairs per training pair


def heldout_pair(a: int, b: int) -> bool:
    """The preference demo's held-out operand pairs: those whose ``b`` is a multiple of 5."""
    return b % 5 == 0


def preference_pair(a: int, b: int) -> dict[str, str]:
    """One pair of the demo task; the domain follows from the first operand."""
    right, off = str(a + b), str(a + b + 1)
    minority = a < 10
    return {
        "prompt": toy_prompt(a, b),
        "chosen": off if minority else right,
        "rejected": right if minority else off,
        "domain": "minority" if minority else "majority",
    }


def generate_preference_dataset(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` pairs, ``MINORITY_SHARE`` of them from the minority, from the ``train`` or
    ``heldout`` operand pairs (pairs may repeat)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        minority = rng.random() < MINORITY_SHARE
        a = rng.randint(0, 9) if minority else rng.randint(10, 99)
        b = rng.randint(0, 99)
        if heldout_pair(a, b) == (split == "heldout"):
            rows.append(preference_pair(a, b))
    return rows


def write_preference_demo(out_dir: str | Path, n: int, seed: int) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (n pairs) and ``eval.jsonl`` (held-out pairs) into ``out_dir``."""
    out = Path(out_dir)
    train = out / f"preference_train_{n}_{seed}.jsonl"
    evals = out / f"preference_eval_{n}_{seed}.jsonl"
    if not train.is_file():
        write_jsonl(generate_preference_dataset(n, seed, "train"), train)
    if not evals.is_file():
        n_eval = max(1, int(n * EVAL_SHARE))
        write_jsonl(generate_preference_dataset(n_eval, seed + 1, "heldout"), evals)
    return train, evals
