r"""Math reward through math-verify: the last ``\boxed{...}`` (else the last number) vs the label.

Timeouts: math-verify bounds its slow sympy paths with ``signal.alarm``, which Python allows only
in the main thread (elsewhere math-verify raises ValueError). Called from the main thread (the
default: ``RewardConfig.timeout_s`` unset runs rewards inline) we pass ``timeout_seconds`` to
``parse``/``verify`` and a slow sample is really interrupted; note SIGALRM is process-wide, so
nothing else in the process should use it. Called from any other thread (``timeout_s`` set, or
a trainer scoring off the main thread) we switch math-verify's timeout off and rely on the
guard's ``timeout_s`` (set it when scoring off the main thread: nothing else bounds the time),
which stops waiting but cannot stop the computation: the abandoned thread keeps its CPU and
memory until sympy returns. A math-verify timeout raises ``TimeoutError``, counted as a timeout.
"""

from __future__ import annotations

import functools
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from megatron_gvpo.rewards.base import EventCounts, RewardInput
from megatron_gvpo.rewards.registry import register_reward

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# not part of a word or a decimal ("3-5" yields 5, "v2" nothing); thousands commas allowed
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
_LATEX = [LatexExtractionConfig()]
_EXPR = [ExprExtractionConfig()]
_GOLD = [LatexExtractionConfig(), ExprExtractionConfig()]


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` with balanced braces, or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for j in range(m.end(), len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[m.end() : j].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (integer, decimal or ``a/b``), commas removed, or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").replace(" ", "") if found else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(label: str, timeout: int | None) -> list:
    text = label if ("$" in label or "\\boxed" in label) else f"${label}$"
    gold = parse(text, _GOLD, parsing_timeout=timeout, raise_on_error=True)
    if not gold:
        raise ValueError(f"label {label!r} has no parseable answer")
    return gold


class MathReward:
    """1.0 when the response's answer equals the label under math-verify, else 0.0."""

    def __init__(self, timeout_seconds: int = 5, last_number_fallback: bool = True) -> None:
        if not isinstance(timeout_seconds, int) or timeout_seconds < 1:
            # signal.alarm takes whole seconds
            raise ValueError(
                f"'kwargs.timeout_seconds' must be an int >= 1, got {timeout_seconds!r}"
            )
        self.timeout_seconds = timeout_seconds
        self.last_number_fallback = last_number_fallback
        self._events = EventCounts()

    def _count(self, key: str) -> None:
        self._events.add(key)

    def pop_counters(self) -> dict[str, int]:
        """``no_answer``, ``last_number`` (fallback used), ``answer_errors`` since the last pop."""
        return self._events.pop()

    def __call__(self, inp: RewardInput) -> float:
        if inp.label is None or not str(inp.label).strip():
            raise ValueError("math reward needs a label (reference answer)")
        on_main = threading.current_thread() is threading.main_thread()
        timeout = self.timeout_seconds if on_main else None
        try:
            gold = _parse_gold(str(inp.label).strip(), timeout)  # a bad label raises: an error
            return self._score(gold, inp.response, timeout)
        except TimeoutException as e:  # a BaseException in math-verify: make it a counted one
            raise TimeoutError(f"math-verify timed out after {self.timeout_seconds} s") from e

    def _score(self, gold: list, response: str, timeout: int | None) -> float:
        boxed = last_boxed(response)
        if boxed is not None:
            text, config = f"${boxed}$", _LATEX
        else:
            number = last_number(response) if self.last_number_fallback else None
            if number is None:
                self._count("no_answer")
                return 0.0
            self._count("last_number")
            text, config = number, _EXPR
        try:
            pred = parse(text, config, parsing_timeout=timeout, raise_on_error=True)
            if not pred:
                self._count("no_answer")
                return 0.0
            ok = verify(gold, pred, timeout_seconds=timeout, raise_on_error=True)
        except Exception:  # the model's answer broke sympy: a wrong answer, not a reward failure
            self._count("answer_errors")
            return 0.0
        return 1.0 if ok else 0.0


register_reward("math", factory=True)(MathReward)
