r"""Format reward: 1.0 when the response has the required shape, else 0.0.

The shape is a regex (``re.DOTALL``; whole response by default) and, optionally, an exact count
of ``\boxed{`` occurrences. The default pattern asks for one ``<think>...</think>`` block first
and a non-empty answer after it, with no other think tags.
"""

from __future__ import annotations

import re
from typing import Literal

from megatron_gvpo.rewards.base import RewardInput
from megatron_gvpo.rewards.registry import register_reward

_NO_TAG = r"(?:(?!</?think>).)"
THINK_ANSWER = rf"\s*<think>{_NO_TAG}*</think>\s*(?!</?think>)\S{_NO_TAG}*"
_BOXED = re.compile(r"\\boxed\s*\{")


class FormatReward:
    """Scores 1.0 when ``pattern`` matches and the ``\\boxed{`` count is ``boxed_count``."""

    def __init__(
        self,
        pattern: str | None = THINK_ANSWER,
        match: Literal["full", "search"] = "full",
        boxed_count: int | None = None,
        ignore_case: bool = False,
    ) -> None:
        if pattern is None and boxed_count is None:
            raise ValueError("'kwargs.pattern' and 'kwargs.boxed_count' are both unset")
        if match not in ("full", "search"):
            raise ValueError(f"'kwargs.match' must be 'full' or 'search', got {match!r}")
        if boxed_count is not None and boxed_count < 0:
            raise ValueError(f"'kwargs.boxed_count' must be >= 0, got {boxed_count}")
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        try:
            self.regex = None if pattern is None else re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"'kwargs.pattern' is not a valid regex ({e}): {pattern!r}") from e
        self.full = match == "full"
        self.boxed_count = boxed_count

    def __call__(self, inp: RewardInput) -> float:
        text = inp.response
        if self.regex is not None:
            m = self.regex.fullmatch(text) if self.full else self.regex.search(text)
            if m is None:
                return 0.0
        if self.boxed_count is not None and len(_BOXED.findall(text)) != self.boxed_count:
            return 0.0
        return 1.0


register_reward("format", factory=True)(FormatReward)
