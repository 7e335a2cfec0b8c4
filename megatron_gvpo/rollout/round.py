"""One rollout round through any engine's stream: progress as samples complete, a per-sample hook."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from megatron_gvpo.rollout.base import GenerateRequest, RolloutEngine, Sample, SamplingParams

OnSample = Callable[[int, int, Sample], None]


def progress_bar():
    """A transient rich progress bar, disabled when stdout is not a terminal (rich's Live still
    prints a newline when it stops on a non-terminal, even when transient)."""
    from rich.progress import Progress

    return Progress(transient=True, disable=not sys.stdout.isatty())


def generate_round(
    engine: RolloutEngine,
    requests: Sequence[GenerateRequest],
    sampling: SamplingParams,
    on_sample: OnSample | None = None,
    progress: bool = True,
) -> list[list[Sample]]:
    """Every response of the round, grouped per request in order (as ``engine.generate``).

    ``on_sample(i, j, sample)`` runs as each response arrives (e.g. to score its reward while
    the rest are still generating); a rich progress bar advances per sample when stdout is a
    terminal (nothing is drawn, not even a blank line, in logs or under CI).
    """
    groups: list[list[Sample | None]] = [[None] * req.n for req in requests]
    total = sum(req.n for req in requests)
    bar = progress_bar() if progress else None
    with bar if bar is not None else nullcontext():
        task = bar.add_task("rollout", total=total) if bar is not None else None
        for i, j, sample in engine.generate_stream(requests, sampling):
            if groups[i][j] is not None:
                raise RuntimeError(f"engine returned response {j} of request {i} twice")
            groups[i][j] = sample
            if on_sample is not None:
                on_sample(i, j, sample)
            if bar is not None:
                bar.advance(task)
    missing = [(i, j) for i, g in enumerate(groups) for j, s in enumerate(g) if s is None]
    if missing:
        raise RuntimeError(f"engine stream ended without {len(missing)} responses, e.g. {missing[0]}")
    return groups  # type: ignore[return-value]

