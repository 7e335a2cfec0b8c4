"""GVPO's off-policy reuse: a bounded buffer of past prompt groups mixed into fresh rounds.

GVPO's Theorem 2 keeps the optimum for any sampling distribution whose support covers theta', so
replayed groups need no importance weights; their theta' logprobs are recomputed by the actor
each round like fresh ones. Groups are plain lists (JSON in checkpoints).
"""

from __future__ import annotations

import random
from collections import deque

# (prompt ids, response ids per sample, reward per sample, domain)
Group = tuple[list[int], list[list[int]], list[float], str | None]


class ReplayBuffer:
    """First-in first-out store of the last ``capacity`` groups."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.groups: deque[Group] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, groups: list[Group]) -> None:
        self.groups.extend(groups)

    def sample(self, k: int, rng: random.Random) -> list[Group]:
        """Up to ``k`` distinct stored groups, drawn with ``rng`` (deterministic for a seed)."""
        k = min(k, len(self.groups))
        return [self.groups[i] for i in sorted(rng.sample(range(len(self.groups)), k))]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "groups": [list(g) for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.groups = deque((tuple(g) for g in state["groups"]), maxlen=self.capacity)
