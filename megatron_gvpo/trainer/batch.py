"""A round's samples as the actor sees them: packed Megatron micro-batches and per-sample tensors."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_gvpo.data.batching import StepPlan, pack_sequences, pad_rows, plan_step
from megatron_gvpo.models.forward import (
    MicroBatch,
    gather_rows,
    response_logprobs,
    sample_token_logprobs,
    scatter_rows,
    step_log_ratio,
)
from megatron_gvpo.parallel.cpu_compat import native_torch

# Per-sample token tensors (one 1-D tensor of response length per sample), padded per micro-batch.
_TOKEN_KEYS = ("old_logprobs", "ref_logprobs", "rollout_logprobs")
# Per-sample scalars, one [N] tensor each.
_SAMPLE_KEYS = ("group_ids", "rewards", "advantages", "domains")


@dataclass
class RolloutBatch:
    """Samples of a round (or of one optimizer step), identical on every rank.

    ``old_logprobs``/``ref_logprobs``: per-sample response-token logprobs under theta' and the
    reference, filled by ``response_token_logprobs``; ``advantages`` are set by objectives that
    use them; ``domains`` index the run's data domains.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    group_ids: Tensor
    rewards: Tensor
    old_logprobs: list[Tensor] | None = None
    ref_logprobs: list[Tensor] | None = None
    advantages: Tensor | None = None
    domains: Tensor | None = None
    rollout_logprobs: list[Tensor] | None = None
    """The engine's response-token logprobs (for TIS in the GRPO family); None when any group
    has none (replayed groups)."""
    loss_masks: list[Tensor] | None = None
    """Per sample, a bool per response token: true on the model's own tokens, false on
    observation tokens of multi-turn trajectories (None: every response token is the model's).
    Packing ands it into ``response_mask``, so every loss, normaliser and token metric sees the
    model's tokens only."""
    routes: list[dict | Tensor] | None = None
    """Routing replay (MoE): per sample, the top-k experts of each of its tokens: recorded under
    theta' (``routing_replay=old``: MoE decoder layer -> [tokens, k], this pipeline stage's
    layers) or as the rollout engine reported them (``rollout``: [MoE layers, tokens, k] of the
    tokens it processed; ``RoutingReplay.before_forward`` reads both); None when routes are not
    replayed."""

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids, strict=True)]

    @property
    def num_response_tokens(self) -> int:
        """The model's response tokens (observation tokens are not counted)."""
        if self.loss_masks is not None:
            return int(sum(int(m.sum()) for m in self.loss_masks))
        return sum(len(r) for r in self.response_ids)

    @property
    def num_trained_sequences(self) -> int:
        """Samples with at least one model token."""
        if self.loss_masks is not None:
            return sum(1 for m in self.loss_masks if bool(m.any()))
        return sum(1 for r in self.response_ids if r)

    def select(self, indices: list[int]) -> RolloutBatch:
        """The sub-batch of ``indices`` (for one mini-batch step of a round)."""
        idx = torch.tensor(indices, dtype=torch.long)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                kw[f.name] = v
            elif isinstance(v, Tensor):
                kw[f.name] = v[idx]
            else:
                kw[f.name] = [v[i] for i in indices]
        return RolloutBatch(**kw)


@dataclass(frozen=True)
class Packing:
    """How a batch is laid out in packed micro-batches (fixed for the run)."""

    max_tokens_per_microbatch: int
    """``trainer.max_tokens_per_microbatch``: the packed row's token budget."""
    keep_groups_whole: bool = True
    """``trainer.keep_groups_whole``: a group's samples share a micro-batch when they fit."""
    pad_multiple: int = 8
    """The packed length is a multiple of this (FP8 GEMMs in Transformer Engine need 16)."""


def plan_for(
    batch: RolloutBatch,
    max_tokens_per_microbatch: int,
    keep_groups_whole: bool = True,
    pad_multiple: int = 8,
) -> StepPlan:
    """``data.batching.plan_step`` over this batch for the current DP size (FP8 GEMMs in
    Transformer Engine need the packed length padded to a multiple of 16)."""
    return plan_step(
        batch.lengths,
        batch.group_ids.tolist(),
        parallel_state.get_data_parallel_world_size(),
        max_tokens_per_microbatch,
        keep_groups_whole=keep_groups_whole,
        pad_multiple=pad_multiple,
    )


@native_torch()
def pack(
    batch: RolloutBatch, layout: Packing | StepPlan, pad_id: int = 0
) -> tuple[StepPlan, list[MicroBatch]]:
    """The batch's placement plan (``layout`` itself, or made by it) and this DP rank's packed
    micro-batches, each carrying its samples' tensors in ``extra``."""
    plan = layout
    if isinstance(layout, Packing):
        plan = plan_for(
            batch, layout.max_tokens_per_microbatch, layout.keep_groups_whole, layout.pad_multiple
        )
    rank = parallel_state.get_data_parallel_rank()
    out = []
    for ids in plan.micro_batches[rank]:
        packed = pack_sequences(
            [batch.prompt_ids[i] for i in ids],
            [batch.response_ids[i] for i in ids],
            plan.seq_len,
            pad_id,
            None if batch.loss_masks is None else [batch.loss_masks[i] for i in ids],
        )
        cu = packed.cu_seqlens
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_kv=packed.max_seqlen,
        )
        idx = torch.tensor(ids, dtype=torch.long)
        extra = {
            "sample_ids": idx,
            "response_index": packed.response_index,
            "response_mask": packed.response_mask,
        }
        for key in _SAMPLE_KEYS:
            v = getattr(batch, key)
            if v is not None:
                extra[key] = v[idx]
        if batch.routes is not None:
            extra["routes"] = [batch.routes[i] for i in ids]
        width = packed.response_index.shape[1]
        for key in _TOKEN_KEYS:
            v = getattr(batch, key)
            if v is not None:
                extra[key] = pad_rows([v[i] for i in ids], width)
        out.append(MicroBatch(packed.tokens, packed.position_ids, params, extra))
    return plan, out


def build_micro_batches(batch: RolloutBatch, plan: StepPlan) -> list[MicroBatch]:
    """This DP rank's packed micro-batches of ``plan``."""
    return pack(batch, plan)[1]


def _flat_offsets(batch: RolloutBatch) -> list[int]:
    offsets = [0]
    for r in batch.response_ids:
        offsets.append(offsets[-1] + len(r))
    return offsets


class _OldLogprobsFromForward:
    """A micro-batch loss wrapper for a round's only update (``ThetaPrime``'s ``first_update``):
    each micro-batch's ``extra["old_logprobs"]`` is set from its forward's detached logprobs
    before the objective's loss reads it; :meth:`collect` then gives every rank every sample's,
    as :func:`response_token_logprobs` would."""

    def __init__(self, loss_fn, batch: RolloutBatch):
        self.loss_fn = loss_fn
        self.offsets = _flat_offsets(batch)
        self.flat = torch.zeros(self.offsets[-1], dtype=torch.float32)

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, mb: MicroBatch):
        old = response_logprobs(logprobs.detach(), mb).float()
        mb.extra["old_logprobs"] = old
        scatter_rows(self.flat, self.offsets, old.cpu(), mb)
        return self.loss_fn(logprobs, entropy, mb)

    def collect(self, model: torch.nn.Module) -> list[Tensor]:
        """Every sample's theta' logprobs on every rank (collective over DP and PP)."""
        return gather_rows(self.flat, self.offsets, model, pp_broadcast=True)


class ThetaPrime:
    """Where a round's theta' logprobs (s', the policy that sampled) come from: decided once per
    run, the only place that writes ``batch.old_logprobs`` in RL training. The reference's
    logprobs, the round's other fixed baseline, come from the same pass over the batch.

    ``forward`` (``trainer.updates_per_round > 1``): a forward-only pass over the round's batch
    before its updates, since later updates move theta away from theta'.
    ``first_update`` (one update per round): theta = theta' during the round's only update, so
    its own forward's detached logprobs *are* s' (no separate pass; TRL skips it too when
    ``num_iterations == 1``), and the step-wide ``s - s'`` is exactly 0 without any forward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        temperature: float,
        updates_per_round: int,
        packing: Packing,
        routing_replay=None,
        reference: torch.nn.Module | None = None,
    ):
        self.model, self.temperature, self.packing = model, temperature, packing
        self.mode = "forward" if updates_per_round > 1 else "first_update"
        self.routing_replay = routing_replay
        self.reference = reference
        self.engine_route_flips: float | None = None
        """``routing_replay=rollout``, ``forward``: share of the engine's routes the theta'
        router would have chosen otherwise (the last theta' pass; DP-local)."""

    def before_updates(self, batch: RolloutBatch) -> None:
        """The round's fixed logprobs, on every rank, from one packing of the batch: s' of every
        sample in ``forward`` mode, and the reference's when there is one. With MoE routing
        replay ``old`` the theta' pass also records the experts theta' routed each token to,
        which every update of the round then replays (``batch.routes``); with ``rollout`` it
        replays the engine's routes (already in ``batch.routes``), so s' routes as the sampling
        engine did."""
        if self.mode != "forward" and self.reference is None:
            return
        offsets = _flat_offsets(batch)
        _, micro_batches = pack(batch, self.packing)
        if self.mode == "forward":
            replay = self.routing_replay
            engine_routes = replay is not None and replay.source == "rollout"
            routing = nullcontext()
            if replay is not None:  # replay the engine's routes (in batch.routes), or record
                routing = replay.replaying() if engine_routes else replay.recording()
            with routing:
                batch.old_logprobs = sample_token_logprobs(
                    self.model, micro_batches, offsets, self.temperature
                )
            if engine_routes:
                self.engine_route_flips = replay.flip_fraction()
            elif replay is not None:
                batch.routes = replay.routes(len(batch))
        if self.reference is not None:  # the same micro-batches
            batch.ref_logprobs = sample_token_logprobs(
                self.reference, micro_batches, offsets, self.temperature
            )

    def update_loss(self, loss_fn, sub: RolloutBatch):
        """The loss to run an update of ``sub`` with (``first_update``: one that records s')."""
        return _OldLogprobsFromForward(loss_fn, sub) if self.mode == "first_update" else loss_fn

    def after_update(self, loss, batch: RolloutBatch, sub: RolloutBatch) -> None:
        """``first_update``: s' of every sample, from the update's forward, on every rank
        (collective; ``sub`` is the whole round there)."""
        if isinstance(loss, _OldLogprobsFromForward):
            batch.old_logprobs = sub.old_logprobs = loss.collect(self.model)

    def step_log_ratio(self, sub: RolloutBatch, micro_batches: list[MicroBatch], first: bool):
        """``() -> s - s'`` [N] float64 of an update's samples at the current theta, on every
        rank: 0 on the round's first update (theta = theta'), else a detached forward."""
        if first:
            return lambda: torch.zeros(len(sub), dtype=torch.float64)
        return lambda: step_log_ratio(
            self.model, micro_batches, len(sub), self.temperature, "old_logprobs"
        )


def response_token_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, plan: StepPlan, temperature: float = 1.0
) -> list[Tensor]:
    """Per-sample response-token logprobs of ``batch`` under ``model``, on every rank."""
    offsets = _flat_offsets(batch)
    return sample_token_logprobs(model, build_micro_batches(batch, plan), offsets, temperature)
