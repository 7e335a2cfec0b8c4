"""torchrun worker: routing replay on a tiny qwen3_moe at EP2 (CPU/gloo).

Run by tests/test_moe.py as ``python -m torch.distributed.run --nproc_per_node 2 <this file>
--hf-dir H --out O``. Records every token's routes in a theta' pass (one placement of the
samples), then perturbs the router weights and runs the samples again under another placement
(small micro-batches, samples moved between DP ranks) with the routes replayed, and without
replay. Rank 0 saves what the test checks against transformers: the recorded routes, the
perturbed router weights, both passes' logprobs and the routes chosen without replay.

With ``--engine-samples E`` (samples and their routes from the embedded rollout engine, a
safetensors file) it then does the same for ``routing_replay=rollout`` under the perturbed
router: the round's theta' pass (``ThetaPrime``, small micro-batches, samples spread over both
DP ranks) replays the engine's routes, and a pass without replay records its own; saved as
``rollout.*``.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.models.moe import MoEConfig
from megatron_gvpo.models.routing_replay import RoutingReplay, set_active
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.trainer.batch import (
    Packing,
    RolloutBatch,
    ThetaPrime,
    plan_for,
    response_token_logprobs,
)


def make_batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for _ in range(6):
        prompts.append(
            torch.randint(
                0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g
            ).tolist()
        )
        responses.append(
            torch.randint(
                0, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g
            ).tolist()
        )
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=torch.tensor([0, 0, 1, 1, 2, 2]),
        rewards=torch.zeros(6),
    )


def rollout_part(ddp, replay: RoutingReplay, arch, path: str, out: dict, meta: dict) -> None:
    """routing_replay=rollout: theta' logprobs with the engine's routes replayed, and without."""
    with safe_open(path, "pt") as f:
        engine = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        rows = json.loads(f.metadata()["batch"])
    n = len(rows["prompts"])
    batch = RolloutBatch(
        prompt_ids=rows["prompts"],
        response_ids=rows["responses"],
        group_ids=torch.arange(n) // 2,
        rewards=torch.zeros(n),
    )
    moe_layers = [i for i, m in enumerate(arch.moe_layers) if m]
    batch.routes = [engine[f"routes.{i}"] for i in range(n)]  # as to_batch carries them
    small = plan_for(batch, 24, keep_groups_whole=False)
    replay.source, replay.moe_layers = "rollout", moe_layers
    packing = Packing(24, keep_groups_whole=False)  # the layout of `small`
    theta_prime = ThetaPrime(ddp, 1.0, 2, packing, replay)  # forward mode: a theta' pass
    theta_prime.before_updates(batch)
    with replay.recording():
        free = response_token_logprobs(ddp, batch, small)
    free_routes = replay.routes(n)
    for i in range(n):
        out[f"rollout.replayed.{i}"] = batch.old_logprobs[i]
        out[f"rollout.free.{i}"] = free[i]
        for layer in moe_layers:
            out[f"rollout.free_routes.{i}.{layer}"] = free_routes[i][layer]
    meta["rollout.flips"] = str(theta_prime.engine_route_flips)
    meta["rollout.micro_batches"] = str(sum(len(m) for m in small.micro_batches))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--engine-samples", help="the embedded engine's samples and routes")
    args = p.parse_args()
    initialize(ParallelConfig(ep=2, seed=1))
    cfg = ModelConfig(precision="fp32", moe=MoEConfig(routing_replay="old"))
    model, arch = build_from_hf(args.hf_dir, cfg)
    ddp = wrap_with_ddp(model)
    replay = RoutingReplay(model)
    set_active(replay)
    batch = make_batch(arch.vocab_size)
    with replay.recording():
        response_token_logprobs(ddp, batch, plan_for(batch, 4096))
    batch.routes = replay.routes(len(batch))

    torch.manual_seed(7)  # the same perturbation on every rank
    layer = next(iter(replay.routers))
    router = replay.routers[layer]
    with torch.no_grad():
        router.weight.add_(0.5 * torch.randn_like(router.weight))
    order = [5, 2, 0, 3, 1, 4]  # another placement: other micro-batches, other DP ranks
    moved = batch.select(order)
    small = plan_for(moved, 24, keep_groups_whole=False)
    with replay.replaying():
        replayed = response_token_logprobs(ddp, moved, small)
    flips = replay.flip_fraction()
    with replay.recording():
        free = response_token_logprobs(ddp, moved, small)
    free_routes = replay.routes(len(moved))
    out = {"router_weight": router.weight.detach().clone()}
    for j, i in enumerate(order):
        out[f"routes.{i}"] = batch.routes[i][layer]
        out[f"free_routes.{i}"] = free_routes[j][layer]
        out[f"replayed.{i}"] = replayed[j]
        out[f"free.{i}"] = free[j]
    meta = {
        "layer": str(layer),
        "flips": str(flips),
        "micro_batches": str(len(small.micro_batches[0]) + len(small.micro_batches[1])),
        "batch": json.dumps({"prompts": batch.prompt_ids, "responses": batch.response_ids}),
    }
    if args.engine_samples:
        rollout_part(ddp, replay, arch, args.engine_samples, out, meta)
    if is_rank0():
        save_file({k: v.contiguous() for k, v in out.items()}, args.out, metadata=meta)
    destroy()


if __name__ == "__main__":
    main()
