"""Routing replay: the experts each token was routed to under theta', used again by every update.

A mixture-of-experts policy's top-k choice is not differentiable and flips under small weight
changes, so the round's updates would otherwise compare s (under theta) with s' (under theta')
for tokens that went through different experts: GVPO's s - s' and the GRPO family's ratio then
measure routing flips as well as the policy. With ``model.moe.routing_replay=old`` the round's
theta' pass records every token's top-k experts per MoE layer and every later forward of the
round (updates and their step-wide logprob passes) routes each token to the same experts; the
routing *probabilities* still come from the current router, so the router keeps its gradient.

megatron-core's routers carry the switch (``moe_enable_routing_replay``: a ``RouterReplay`` per
router that records the top-k indices or replays given ones); this module maps those per-pass
token rows to samples and back. Routes are kept per sample (``RolloutBatch.routes``; recorded:
per MoE layer of this pipeline stage, [tokens, top-k]) so any placement of the samples in
micro-batches and DP ranks replays them. Under sequence parallelism (TP > 1) a router sees only
its TP rank's slice of the packed row: the recorded slices are gathered over TP, and each rank
replays its own.

With ``model.moe.routing_replay=rollout`` the routes come from the rollout engine instead: it
reports, per sample, the experts it chose for every token it processed (``Sample.routes``:
[MoE layers, tokens, top-k], the prompt and every response token it fed back, so all but the
last; kept per sample as reported and read by :meth:`RoutingReplay.before_forward`), and the
round's theta' pass and every update replay them, so the trained logprobs route exactly as the
sampling engine did. A token the engine reported no route for (a sample's last token, whose
output feeds no trained logprob; observation tokens appended after a trajectory's last model
turn) is routed by the current router (:data:`NO_ROUTE` in the targets); it is never counted in
the flip share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_gvpo.models.moe import _routers

ROUTING_REPLAY_MODES = ("off", "old", "rollout")
NO_ROUTE = -1
"""A target row the replay leaves to the current router (the engine reported no route)."""


def engine_layer_routes(routes: torch.Tensor, row: int, out: torch.Tensor) -> torch.Tensor:
    """Write one MoE layer's router targets of a sample from the engine's report into ``out``.

    ``routes``: [MoE layers, n, top-k] integer experts of the sample's first ``n`` tokens (prompt,
    then response), as the engine reports them; ``row``: the layer's place among the model's MoE
    layers; ``out``: the sample's [tokens, top-k] long targets. Rows past ``n`` get
    :data:`NO_ROUTE`. Returns ``out``.
    """
    n = min(routes.shape[1], out.shape[0])
    out[:n] = routes[row, :n]
    out[n:] = NO_ROUTE
    return out


def check_engine_routes(routes: Sequence[torch.Tensor], num_moe_layers: int) -> None:
    """Refuse engine reports that are not [``num_moe_layers``, tokens, top-k] (on every rank,
    before any forward, so that no rank waits in a collective for one that failed)."""
    for i, r in enumerate(routes):
        if r.dim() != 3 or r.shape[0] != num_moe_layers:
            raise ValueError(
                f"model.moe.routing_replay=rollout: the engine's routes of sample {i} have shape "
                f"{tuple(r.shape)}, expected [{num_moe_layers} MoE layers, tokens, top-k]"
            )


class RoutingReplay:
    """Records routes per sample during a theta' pass and replays them during updates.

    ``source``: where the replayed routes come from, ``old`` (recorded by the theta' pass) or
    ``rollout`` (reported by the engine; the theta' pass replays them too). ``moe_layers``: the
    model's MoE decoder layers in order (0-based), the rows of the engine's reports."""

    def __init__(self, model: torch.nn.Module, source: str = "old", moe_layers: Sequence[int] = ()):
        if source not in ("old", "rollout"):
            raise ValueError(f"model.moe.routing_replay={source!r}: a replay needs old or rollout")
        self.source = source
        self.moe_layers = list(moe_layers)
        self.routers = {r.layer_number - 1: r for r in _routers(model)}
        if any(r.router_replay is None for r in self.routers.values()):
            raise ValueError("routing replay needs a model built with moe_enable_routing_replay")
        if source == "rollout" and not set(self.routers) <= set(self.moe_layers):
            raise ValueError(
                f"routing replay from the engine: routers of layers {sorted(self.routers)} are not "
                f"all among the model's MoE layers {self.moe_layers}"
            )
        self.mode: str | None = None
        self._mb = None  # the micro-batch whose forward runs now (its sample ids and spans)
        self._real = torch.zeros(0, dtype=torch.bool)  # its rows that are tokens, not padding
        self._recorded: dict[int, dict[int, torch.Tensor]] = {}
        self.flips = torch.zeros(2, dtype=torch.float64)  # (tokens whose own top-k differ, tokens)
        self._own: dict[int, torch.Tensor] = {}  # per layer: the current router's own top-k
        self._free: dict[int, torch.Tensor] = {}  # per layer: rows with no target (NO_ROUTE)
        for router in self.routers.values():
            router.register_forward_pre_hook(self._before_router)
            router.register_forward_hook(self._after_router)

    # ---- recording --------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self):
        """Record the routes of every forward in the block; :meth:`routes` returns them."""
        self._recorded = {}
        with self._action("RECORD", "record"):
            yield self

    def routes(self, num_samples: int) -> list[dict[int, torch.Tensor]]:
        """Per sample of the recorded batch, this stage's layer -> [tokens, top-k] (collective
        over DP: every rank learns the samples the other ranks recorded)."""
        recorded = self._recorded
        if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
            gathered: list = [None] * parallel_state.get_data_parallel_world_size()
            dist.all_gather_object(
                gathered, recorded, group=parallel_state.get_data_parallel_group_gloo()
            )
            recorded = {k: v for part in gathered for k, v in part.items()}
        missing = [i for i in range(num_samples) if self.routers and i not in recorded]
        if missing:
            raise RuntimeError(f"routing replay: no routes recorded for samples {missing[:8]}")
        return [recorded.get(i, {}) for i in range(num_samples)]

    # ---- replaying --------------------------------------------------------------------------

    @contextlib.contextmanager
    def replaying(self):
        """Route every forward in the block by the micro-batches' ``extra["routes"]``."""
        self.flips.zero_()
        with self._action("REPLAY_FORWARD", "replay"):
            yield self

    def flip_fraction(self) -> float:
        """Share of replayed token-layer routes the current router would have chosen otherwise."""
        return float(self.flips[0] / self.flips[1]) if self.flips[1] else 0.0

    # ---- per micro-batch --------------------------------------------------------------------

    def before_forward(self, mb) -> None:
        """Called by the forward step with the micro-batch about to run: under replay, each
        router's targets from the micro-batch's samples' routes (padding rows: experts 0..k-1,
        never counted; :data:`NO_ROUTE` rows: the router's own choice). A sample's routes are
        either recorded (layer -> [tokens, top-k]) or the engine's report ([MoE layers, tokens,
        top-k] of its first tokens; the rest :data:`NO_ROUTE`)."""
        self._mb = mb
        if self.mode != "replay":
            return
        routes = mb.extra.get("routes") if mb.extra else None
        if routes is None:
            raise RuntimeError("routing replay: a replayed micro-batch carries no routes")
        spans = _spans(mb)
        length = mb.tokens.numel()
        real = torch.zeros(length, dtype=torch.bool)
        for start, end in spans:
            real[start:end] = True
        self._real = _local_rows(real)  # padding rows take arbitrary experts, never counted
        engine_row = {layer: i for i, layer in enumerate(self.moe_layers)}  # rows of a report
        for layer, router in self.routers.items():
            k = router.topk
            target = torch.arange(k, dtype=torch.long).expand(length, k).clone()  # padding
            for (start, end), sample in zip(spans, routes, strict=False):
                if isinstance(sample, torch.Tensor):  # the engine's report, every MoE layer
                    engine_layer_routes(sample, engine_row[layer], target[start:end])
                else:
                    target[start:end] = sample[layer]
            router.router_replay.target_topk_idx = _local_rows(target)

    def _before_router(self, router, args) -> None:
        """Replay: the router's own top-k of its input (for the flip share), and the rows with
        no target (:data:`NO_ROUTE`) given it."""
        if self.mode != "replay":
            return
        with torch.no_grad():
            logits = torch.nn.functional.linear(
                args[0].reshape(-1, args[0].shape[-1]).float(), router.weight.float()
            )
            own = logits.topk(router.topk, dim=-1).indices
        replay = router.router_replay
        target = replay.target_topk_idx.to(own.device)
        free = (target < 0).any(-1)
        replay.target_topk_idx = torch.where(free.unsqueeze(-1), own, target)  # no host sync
        layer = router.layer_number - 1
        self._own[layer], self._free[layer] = own.sort(-1).values.cpu(), free.cpu()

    def _after_router(self, router, args, output) -> None:
        if self.mode == "record":
            rows = _full_rows(router.router_replay.recorded_topk_idx.detach()).cpu()
            ids = self._mb.extra["sample_ids"].tolist()
            for (start, end), i in zip(_spans(self._mb), ids, strict=False):
                self._recorded.setdefault(i, {})[router.layer_number - 1] = rows[start:end].clone()
        elif self.mode == "replay":
            layer = router.layer_number - 1
            own, counted = self._own.pop(layer), self._real & ~self._free.pop(layer)
            used = router.router_replay.target_topk_idx.sort(-1).values.cpu()
            changed = (own != used).any(-1) & counted
            self.flips += torch.tensor(
                [float(changed.sum()), float(counted.sum())], dtype=torch.float64
            )

    @contextlib.contextmanager
    def _action(self, action: str, mode: str):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        for router in self.routers.values():
            router.router_replay.set_router_replay_action(getattr(RouterReplayAction, action))
        self.mode = mode
        try:
            yield
        finally:
            self.mode, self._mb = None, None
            for router in self.routers.values():
                router.router_replay.clear_router_replay_action()
                router.router_replay.clear_indices()


def _spans(mb) -> list[tuple[int, int]]:
    """(start, end) of each sample of a packed micro-batch row, in ``extra["sample_ids"]`` order."""
    cu = mb.packed_seq_params.cu_seqlens_q.tolist()
    n = len(mb.extra["sample_ids"])
    return list(zip(cu[:n], cu[1 : n + 1], strict=True))


def _sequence_parallel() -> bool:
    return parallel_state.get_tensor_model_parallel_world_size() > 1


def _full_rows(local: torch.Tensor) -> torch.Tensor:
    """A router's token rows of the whole packed row (gathered over TP under sequence parallel)."""
    if not _sequence_parallel():
        return local
    parts = [
        torch.empty_like(local)
        for _ in range(parallel_state.get_tensor_model_parallel_world_size())
    ]
    dist.all_gather(
        parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts)


def _local_rows(full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a packed row's token rows (the whole row without SP)."""
    if not _sequence_parallel():
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]


_ACTIVE: RoutingReplay | None = None


def set_active(replay: RoutingReplay | None) -> None:
    """The replay the forward step informs of each micro-batch (None: none)."""
    global _ACTIVE
    _ACTIVE = replay


def notify_forward(mb) -> None:
    """Tell the active replay (if any) which micro-batch runs next."""
    if _ACTIVE is not None and _ACTIVE.mode is not None:
        _ACTIVE.before_forward(mb)
