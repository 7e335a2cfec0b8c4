"""The tool-use demo: addition with a calculator the model may call.

A turn that writes ``calc(A+B)`` gets the result back as the observation ``=S`` and a next turn;
a turn without a call is the answer, rewarded like the plain task (1 when its last integer is
the sum) and ending the trajectory. ``rollout.turn_stop=[")"]`` ends a turn right after the
call, so the model reads the result before it answers.

The demo task (``build_tool_demo``) is three-digit addition, too long for the tiny model to add
reliably in its head. Its warm start (``tool_rows``) writes the bare sum in most answers and,
in ``tool_share`` of them, calls the tool and copies its result (the result itself is not
trained on: the environment writes it). RL with the environment then has something to find:
the answers that call the tool are right far more often. ``tools/make_tool_demo.py`` builds the
model and the prompt files; ``docs/benchmarks.md`` has the command and the results.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_gvpo.demo.task import generate_toy_dataset, is_heldout, toy_prompt, toy_reward

CALL = re.compile(r"calc\(\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*\)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Calculator:
    """One trajectory of the addition task, with a ``calc(A+B)`` tool (also ``-`` and ``*``)."""

    def __init__(self, row: dict):
        self.answer = row.get("answer")
        self.calls = 0

    def reset(self) -> str | None:
        return None

    def step(self, action: str) -> tuple[str | None, float, bool]:
        call = CALL.search(action)
        if call is None:
            return None, toy_reward(action, self.answer or ""), True
        self.calls += 1
        a, op, b = call.groups()
        return f"={_OPS[op](int(a), int(b))}", 0.0, False


DIGITS = 3


def tool_call(a: int, b: int, digits: int = DIGITS) -> str:
    """The tool call a teacher writes for a + b (operands as the prompt writes them)."""
    return f"calc({a:0{digits}d}+{b:0{digits}d})"


def tool_rows(n: int, seed: int, tool_share: float, digits: int = DIGITS) -> list[dict]:
    """``n`` warm-start rows on training-split pairs: with probability ``tool_share`` the call,
    the tool's result (not trained on) and the sum copied from it; else the bare sum."""
    rng = random.Random(seed)
    top = 10**digits - 1
    rows = []
    while len(rows) < n:
        a, b = rng.randint(0, top), rng.randint(0, top)
        if is_heldout(a, b, digits):
            continue
        row = {"prompt": toy_prompt(a, b, digits), "response": str(a + b)}
        if rng.random() < tool_share:
            row["segments"] = [(tool_call(a, b, digits), True), (f"={a + b}", False),
                               (str(a + b), True)]
        rows.append(row)
    return rows


@dataclass
class ToolDemoConfig:
    """The tool demo's warm start and data (``tools/make_tool_demo.py``)."""

    seed: int = 0
    steps: int = 1000
    """Supervised steps of the warm start (batch 64, the plain demo's schedule)."""
    tool_share: float = 0.15
    """Share of warm-start answers that call the tool."""
    train_prompts: int = 2000
    heldout_prompts: int = 200


def build_tool_demo(out_dir: str | Path, cfg: ToolDemoConfig | None = None) -> dict:
    """Write ``model/`` (the warm-started tiny model), ``train.jsonl`` and ``heldout.jsonl``
    (three-digit sums; held-out pairs never seen in the warm start nor in training prompts)
    into ``out_dir``; return the warm start's settings and timing."""
    import torch

    from megatron_gvpo.demo.model import WarmStartConfig, save, train
    from megatron_gvpo.demo.task import build_char_tokenizer, write_jsonl

    cfg = cfg or ToolDemoConfig()
    start = time.perf_counter()
    out = Path(out_dir)
    warm = WarmStartConfig(seed=cfg.seed, steps=cfg.steps)
    tokenizer = build_char_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = tool_rows(warm.steps * warm.batch_size, cfg.seed, cfg.tool_share)
        model = train(warm, tokenizer, rows)
    finally:
        torch.set_num_threads(threads)
    save(model, tokenizer, out / "model")
    data_seed = cfg.seed + 7919
    write_jsonl(generate_toy_dataset(cfg.train_prompts, data_seed, DIGITS, "train"),
                out / "train.jsonl")
    write_jsonl(generate_toy_dataset(cfg.heldout_prompts, data_seed + 1, DIGITS, "heldout"),
                out / "heldout.jsonl")
    info = {**asdict(cfg), "seconds": round(time.perf_counter() - start, 1)}
    (out / "tool_demo.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
