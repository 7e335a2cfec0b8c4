"""Deterministic, resumable prompt sampler: one permutation per epoch from (seed, epoch).

Batches run on across epoch boundaries (each prompt appears once per epoch), so any batch size
works. ``state_dict()`` is (epoch, position) plus what must match on resume; a sampler restored
from it hands out exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

SAMPLINGS = ("auto", "uniform", "proportional", "balanced")
"""``data.sampling``'s values: the modes :func:`build_sampler` builds."""


class PromptSampler:
    """Hands out batches of prompt indices in ``range(num_prompts)``."""

    def __init__(self, num_prompts: int, batch_size: int, shuffle: bool = True, seed: int = 0):
        if num_prompts < 1:
            raise ValueError(f"PromptSampler needs at least one prompt, got {num_prompts}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {seed}")
        self.num_prompts, self.batch_size = num_prompts, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of all prompt indices in ``epoch``: a function of (seed, epoch) only."""
        if not self.shuffle:
            return np.arange(self.num_prompts)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        return rng.permutation(self.num_prompts)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices, rolling into the next epoch(s) when one runs out."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.num_prompts - self.position)
            order = self._order_of(self.epoch)
            batch.extend(order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (epoch, position) and what a resumed sampler must share."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the dataset size, seed and shuffle flag must be unchanged
        (else the saved position points into a different order). The batch size may change."""
        for key in ("num_prompts", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r}, this run has "
                    f"{getattr(self, key)!r}: resuming would not continue the same prompt order"
                )
        if not 0 <= state["position"] < self.num_prompts or state["epoch"] < 0:
            raise ValueError(f"sampler state out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DomainProportionSampler:
    """Group-Robust PO's draw (Ramesh et al. 2024, Alg. 1): a domain d with probability N_d/N,
    then one of its rows uniformly, with replacement. Batch b is a function of (seed, b) only,
    so ``state_dict()`` is the batch count."""

    def __init__(self, row_domains: list[int], batch_size: int, seed: int = 0):
        if not row_domains:
            raise ValueError("DomainProportionSampler needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.members: dict[int, np.ndarray] = {}
        for g in sorted(set(row_domains)):
            self.members[g] = np.array([i for i, x in enumerate(row_domains) if x == g])
        self.num_rows, self.batch_size, self.seed = len(row_domains), batch_size, seed
        self.batches = 0

    def next_batch(self) -> list[int]:
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.batches]))
        )
        groups = list(self.members)
        probs = np.array([len(self.members[g]) for g in groups], dtype=np.float64) / self.num_rows
        drawn = rng.choice(len(groups), size=self.batch_size, p=probs)
        self.batches += 1
        return [int(rng.choice(self.members[groups[k]])) for k in drawn]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_rows", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)!r}, this run has "
                    f"{getattr(self, key)!r}: resuming would not continue the same draws"
                )
        self.batches = int(state["batches"])


class DomainBalancedSampler:
    """Stratified steps over D domains: by default each batch holds ``batch_size // D`` rows of
    every domain, and the ``batch_size % D`` left over go to domains in turn (rotating with the
    batch count); with ``allocation`` (a callable: batch size -> rows per domain, e.g. in
    proportion to group-robust alpha) each batch holds what it returns at draw time. Each
    domain's rows come in shuffled epochs of their own (a function of (seed, domain, epoch)), so
    a small domain is cycled through more often than a large one, each of its rows equally
    often. Domains are interleaved within a batch, so a contiguous part of it holds about its
    share of each. ``state_dict()`` is the batch count and the rows drawn per domain."""

    def __init__(
        self,
        row_domains: list[int],
        batch_size: int,
        seed: int = 0,
        allocation: Callable[[int], list[int]] | None = None,
    ):
        if not row_domains:
            raise ValueError("DomainBalancedSampler needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        domains = sorted(set(row_domains))
        self.members = [
            np.array([i for i, x in enumerate(row_domains) if x == d]) for d in domains
        ]
        self.num_rows, self.batch_size, self.seed = len(row_domains), batch_size, seed
        self.batches = 0
        self.drawn = [0] * len(domains)
        self.allocation = allocation

    def _row(self, k: int, j: int) -> int:
        members = self.members[k]
        epoch, pos = divmod(j, len(members))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, k, epoch])))
        return int(members[rng.permutation(len(members))[pos]])

    def quotas(self, batch: int) -> list[int]:
        """Rows of each domain in batch number ``batch``."""
        d = len(self.members)
        base, extra = divmod(self.batch_size, d)
        return [base + (1 if (k - batch) % d < extra else 0) for k in range(d)]

    def next_batch(self) -> list[int]:
        quotas = self.quotas(self.batches)
        if self.allocation is not None:
            quotas = [int(q) for q in self.allocation(self.batch_size)]
            d, b = len(self.members), self.batch_size
            if len(quotas) != d or sum(quotas) != b or min(quotas) < 0:
                raise ValueError(f"allocation {quotas} does not split {b} rows over {d} domains")
        keyed = []
        for k, q in enumerate(quotas):
            # Interleaved: domain k's j-th row at position (j + 1/2) / q of the batch, so any
            # contiguous slice (e.g. one of a round's updates) holds its share of each domain.
            keyed += [((j + 0.5) / q, k, self._row(k, self.drawn[k] + j)) for j in range(q)]
            self.drawn[k] += q
        self.batches += 1
        return [row for _, _, row in sorted(keyed)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "drawn": list(self.drawn),
            "num_rows": self.num_rows,
            "seed": self.seed,
            "domain_sizes": [len(m) for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("num_rows", self.num_rows),
            ("seed", self.seed),
            ("domain_sizes", [len(m) for m in self.members]),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)!r}, this run has "
                    f"{mine!r}: resuming would not continue the same draws"
                )
        self.batches, self.drawn = int(state["batches"]), [int(x) for x in state["drawn"]]


def build_sampler(
    sampling: str,
    row_domains: list[int],
    batch_size: int,
    shuffle: bool,
    seed: int,
    allocation: Callable[[int], list[int]] | None = None,
):
    """The ``data.sampling`` sampler over rows labelled ``row_domains``. ``allocation``: the
    objective's rows per domain of a step (group-robust objectives with the stratified
    estimator), which ``auto`` follows; without it ``auto`` is uniform."""
    if sampling == "auto":
        if allocation is not None:
            return DomainBalancedSampler(row_domains, batch_size, seed, allocation)
        sampling = "uniform"
    if sampling == "balanced":
        return DomainBalancedSampler(row_domains, batch_size, seed)
    if sampling == "proportional":
        return DomainProportionSampler(row_domains, batch_size, seed)
    return PromptSampler(len(row_domains), batch_size, shuffle, seed)
