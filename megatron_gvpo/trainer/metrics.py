"""One metrics contract for losses and engines: tagged values, one reduction.

A loss reports, per micro-batch, a dict of :class:`Metric` values, each tagged with how it combines
over micro-batches, pipeline stages and data-parallel ranks:

- ``sum``: added up (a micro-batch's share of a step-wide total: the loss, token counts);
- ``mean``: a mean weighted by ``weight`` (a per-micro-batch mean over ``weight`` tokens/samples);
- ``max`` / ``min``: the extreme over everything;
- ``same``: identical everywhere it is reported (a step-wide count every micro-batch repeats).

:func:`reduce_metrics` turns the micro-batch dicts of every rank into one float per key, on every
rank. Nothing is dropped: a key is reported with whatever tag its producer gave it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_gvpo.parallel.initialize import device

Reduce = Literal["sum", "mean", "max", "min", "same"]


@dataclass(frozen=True)
class Metric:
    """A value and the rule that combines it with the others of its key."""

    value: float | Tensor
    reduce: Reduce = "sum"
    weight: float | Tensor = 1.0


def _f(x: float | Tensor) -> float:
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


def reduce_metrics(results: list[dict[str, Metric]]) -> dict[str, Metric]:
    """One value per key from every rank's micro-batch metrics (results live on the last PP
    stage; its TP ranks hold copies), identical on every rank; the rule is kept."""
    local: dict[str, tuple[Reduce, float, float]] = {}  # key -> (rule, accumulated, weight)
    for r in results:
        for k, m in r.items():
            v, w = _f(m.value), _f(m.weight)
            if k not in local:
                local[k] = (m.reduce, v * w if m.reduce == "mean" else v, w)
                continue
            rule, acc, wsum = local[k]
            if rule != m.reduce:
                raise ValueError(f"metric {k!r} is reported as both {rule!r} and {m.reduce!r}")
            if rule == "mean":
                local[k] = (rule, acc + v * w, wsum + w)
            elif rule == "sum":
                local[k] = (rule, acc + v, wsum)
            elif rule == "max":
                local[k] = (rule, max(acc, v), wsum)
            elif rule == "min":
                local[k] = (rule, min(acc, v), wsum)
            else:  # same
                local[k] = (rule, v, wsum)
    if dist.is_initialized() and dist.get_world_size() > 1:
        local = _reduce_over_ranks(local)
    out = {}
    for k, (rule, acc, wsum) in sorted(local.items()):
        if rule != "mean":
            out[k] = Metric(acc, rule)
        elif wsum > 0:
            out[k] = Metric(acc / wsum, rule, wsum)
    return out


def _reduce_over_ranks(local: dict[str, tuple[Reduce, float, float]]) -> dict:
    """Every rank learns every key (PP stages other than the last have none), then one SUM and
    one MAX all-reduce carry the values (min as max of the negation)."""
    keys: list[list[tuple[str, Reduce]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(keys, sorted((k, v[0]) for k, v in local.items()))
    rules = dict(sorted({kv for rank in keys for kv in rank}))
    names = sorted(rules)
    dev = device()
    sums = torch.zeros(2 * len(names) + len(names), dtype=torch.float64, device=dev)
    maxes = torch.full((len(names),), -float("inf"), dtype=torch.float64, device=dev)
    last_stage_copy = parallel_state.get_tensor_model_parallel_rank() != 0
    for i, k in enumerate(names):
        if k not in local:
            continue
        rule, acc, wsum = local[k]
        if rule in ("sum", "mean"):
            if not last_stage_copy:  # TP ranks of the last stage repeat the same values
                sums[2 * i], sums[2 * i + 1] = acc, wsum
        elif rule in ("max", "same"):
            maxes[i] = acc
        else:
            maxes[i] = -acc
        sums[2 * len(names) + i] = 1.0  # reported here
    dist.all_reduce(sums)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    sums, maxes = sums.cpu().tolist(), maxes.cpu().tolist()
    out = {}
    for i, k in enumerate(names):
        if sums[2 * len(names) + i] == 0:
            continue
        rule = rules[k]
        if rule in ("sum", "mean"):
            out[k] = (rule, sums[2 * i], sums[2 * i + 1])
        elif rule == "min":
            out[k] = (rule, -maxes[i], 0.0)
        else:
            out[k] = (rule, maxes[i], 0.0)
    return out


def combine_updates(per_update: list[dict[str, Metric]]) -> dict[str, float]:
    """A round's value of each key over its optimizer steps: the extreme for ``max``/``min``,
    else the mean over the steps that reported it."""
    out: dict[str, float] = {}
    for k in sorted({k for m in per_update for k in m}):
        got = [m[k] for m in per_update if k in m]
        values = [_f(m.value) for m in got]
        if got[0].reduce == "max":
            out[k] = max(values)
        elif got[0].reduce == "min":
            out[k] = min(values)
        else:
            out[k] = sum(values) / len(values)
    return out


class PhaseClock:
    """Wall time per phase of a round (``time/<phase>``) and the step's total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def split(self, phase: str, part: str, seconds: float) -> None:
        """``seconds`` of ``phase`` were really ``part``."""
        self.seconds[phase] -= seconds
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def metrics(self, tokens: int) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        out["throughput/tokens_per_s"] = tokens / max(out["time/step"], 1e-9)
        return out


def logprob_mismatch(actor: list[torch.Tensor], groups: Sequence) -> dict:
    """|engine logprob - actor theta' logprob| over the fresh samples' response tokens (the
    batch's first rows; replayed groups carry no engine logprobs)."""
    engine = [lp for g in groups for lp in g.engine_logprobs]
    masks = [
        g.loss_masks[j] if g.loss_masks else None
        for g in groups
        for j in range(len(g.engine_logprobs))
    ]
    kept = [(a, e, m) for a, e, m in zip(actor, engine, masks, strict=False) if len(e)]
    if not kept:
        return {}
    # one subtraction over the concatenated samples (the same values as per sample)
    d = (
        torch.cat([torch.as_tensor(e, dtype=torch.float32) for _, e, _ in kept])
        - torch.cat([a for a, _, _ in kept])
    ).abs()
    if any(m is not None for _, _, m in kept):
        d = d[torch.cat([_model_tokens(m, len(e)) for _, e, m in kept])]
    if not d.numel():
        return {}
    return {
        "rollout/logprob_abs_diff/mean": d.mean().item(),
        "rollout/logprob_abs_diff/max": d.max().item(),
    }


def _model_tokens(mask: list[int] | None, n: int) -> torch.Tensor:
    """Which of ``n`` response tokens are the model's (all without a mask)."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool)
    return torch.tensor(mask, dtype=torch.bool)
