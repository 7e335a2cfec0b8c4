"""The tool-use demo environment: the addition task with a calculator the model may call.

A turn that writes ``calc(A+B)`` gets the result back as the observation ``=S`` and a next turn;
a turn without a call is the answer, rewarded like the plain task (1 when its last integer is
the sum) and ending the trajectory. Run it with::

    python -m megatron_gvpo.train reward.rewards=[] rollout.max_turns=2 \\
        rollout.env=megatron_gvpo.demo.calculator:Calculator 'rollout.turn_stop=[")"]'

(``rollout.turn_stop`` ends a turn right after the call, so the model reads the result before
it answers.)
"""

from __future__ import annotations

import re

from megatron_gvpo.demo.task import toy_reward

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
