"""Imbalanced data sets for group-robust objectives, written as JSONL (train and held-out).

Two-digit additions ``aa+bb=`` (both operands 10..99), labelled by domain: ``carry`` when the ones
digits carry (a % 10 + b % 10 >= 10), else ``nocarry``. The training file holds ``--minority``
(default 10%) carry pairs and the rest nocarry; the held-out file holds ``--eval-per-domain`` pairs
of each domain, on operand pairs never in training (``b % 5 == 0``), so each domain's held-out
accuracy is measured on the same number of pairs.

- ``shared``: both domains follow one rule: the right sum is chosen over an off-by-one or
  off-by-ten sum (either sign, drawn per pair).
- ``own_rule``: nocarry pairs as in ``shared``; carry raters prefer the digit-reversed sum
  (``57+38=`` -> ``59``) over the right sum: a rule of their own that the majority's data
  contradicts (sums whose reversal equals them are skipped).
- ``own_rule_hard``: nocarry pairs as in ``shared``; carry raters want the sum written backwards
  and prefer the reversed right sum over the reversed off-by-one or off-by-ten sum: telling the
  two apart needs the sum itself, so this rule is as hard as the majority's and has 10% of the data.
- ``rl``: prompts for RL (``{prompt, answer, domain}``, the built-in reward's format), carry the
  harder and the smaller domain; the split is the demo task's (``demo.task.is_heldout``: pairs the
  warm-started demo model never saw), so held-out accuracy measures generalisation.

    python tools/robust_sets.py --kind shared --out data/robust_shared
    python -m megatron_gvpo.train algorithm=gr_dpo data=preference \\
        data.path=data/robust_shared/train.jsonl data.eval_path=data/robust_shared/eval.jsonl
    python tools/robust_sets.py --kind rl --out data/robust_rl
    python -m megatron_gvpo.train algorithm=gr_gvpo data.builtin=null \\
        data.path=data/robust_rl/train.jsonl data.eval_path=data/robust_rl/eval.jsonl
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from megatron_gvpo.demo.task import is_heldout as demo_heldout
from megatron_gvpo.demo.task import toy_prompt, write_jsonl

KINDS = ("shared", "own_rule", "own_rule_hard", "rl")


def is_heldout(a: int, b: int) -> bool:
    """Held-out operand pairs: those whose second operand is a multiple of 5."""
    return b % 5 == 0


def domain_of(a: int, b: int) -> str:
    return "carry" if a % 10 + b % 10 >= 10 else "nocarry"


def make_pair(a: int, b: int, kind: str, rng: random.Random) -> dict[str, str] | None:
    """One row: a pair ``{prompt, chosen, rejected, domain}`` (None when the rule has no pair
    here), or for ``rl`` a prompt ``{prompt, answer, domain}``."""
    right = a + b
    domain = domain_of(a, b)
    if kind == "rl":
        return {"prompt": toy_prompt(a, b), "answer": right, "domain": domain}
    if kind == "own_rule" and domain == "carry":
        flipped = str(right)[::-1]
        if flipped == str(right):
            return None
        chosen, rejected = flipped, str(right)
    elif kind == "own_rule_hard" and domain == "carry":
        off = str(right + rng.choice((-10, -1, 1, 10)))
        chosen, rejected = str(right)[::-1], off[::-1]
    else:
        chosen, rejected = str(right), str(right + rng.choice((-10, -1, 1, 10)))
    return {"prompt": toy_prompt(a, b), "chosen": chosen, "rejected": rejected, "domain": domain}


def operand_pairs(kind: str, domain: str, heldout: bool) -> list[tuple[int, int]]:
    split = demo_heldout if kind == "rl" else is_heldout
    return [
        (a, b)
        for a in range(10, 100)
        for b in range(10, 100)
        if domain_of(a, b) == domain and split(a, b) == heldout
    ]


def draw(kind: str, domain: str, n: int, heldout: bool, rng: random.Random) -> list[dict]:
    """``n`` rows of one domain (operand pairs may repeat once all are used)."""
    pool = operand_pairs(kind, domain, heldout)
    rows: list[dict] = []
    while len(rows) < n:
        rng.shuffle(pool)
        for a, b in pool:
            row = make_pair(a, b, kind, rng)
            if row is not None:
                rows.append(row)
            if len(rows) == n:
                break
    return rows


def build(
    kind: str, n_train: int, minority: float, eval_per_domain: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of one set."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 < minority < 1:
        raise ValueError(f"--minority must lie in (0, 1), got {minority}")
    rng = random.Random(seed)
    n_min = max(1, round(n_train * minority))
    train = draw(kind, "carry", n_min, False, rng) + draw(kind, "nocarry", n_train - n_min, False, rng)
    rng.shuffle(train)
    held = draw(kind, "carry", eval_per_domain, True, rng)
    held += draw(kind, "nocarry", eval_per_domain, True, rng)
    return train, held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--minority", type=float, default=0.1, help="share of carry pairs in training")
    p.add_argument("--eval-per-domain", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train, held = build(args.kind, args.n_train, args.minority, args.eval_per_domain, args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held, args.out / "eval.jsonl")
    print(f"{args.out}: {len(train)} training rows, {len(held)} held-out rows")


if __name__ == "__main__":
    main()
