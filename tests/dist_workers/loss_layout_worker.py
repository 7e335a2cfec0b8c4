"""torchrun worker: parameter gradients of one GVPO/GRPO/DAPO/DPO step at a given (TP, PP, DP, EP) layout.

Run by tests/test_loss_layout.py as
``python -m torch.distributed.run --nproc_per_node W <this file> --hf-dir H --tp T --pp P ...``.
Every rank builds the same synthetic step batch (``make_batch``), places it with
``data.batching.plan_step`` under a token budget, runs the real training path (megatron DDP,
``forward_backward``, the registered objective's ``step_loss`` from ``trainer/objectives/``) once
per loss and rank 0 saves the HF-named gradients. Preference losses run on a batch of pairs
(``make_pair_batch``).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from safetensors.torch import save_file

from megatron_gvpo.algorithms.grpo import group_advantages
from megatron_gvpo.algorithms.gvpo import num_counted_groups
from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.bridge.weights import gather_hf_tensors
from megatron_gvpo.models.forward import forward_backward, step_log_ratio
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize
from megatron_gvpo.parallel.launch import is_rank0
from megatron_gvpo.trainer.batch import (
    RolloutBatch,
    build_micro_batches,
    plan_for,
    response_token_logprobs,
)
from megatron_gvpo.trainer.objectives import StepInputs, algorithm_config, build_objective
from megatron_gvpo.trainer.objectives.gvpo import GVPOMicroBatchLoss

GROUP_SIZES = (4, 1, 3, 5, 2, 4, 3)  # variable sizes, one singleton
BETA = 0.1


def make_batch(vocab: int, seed: int = 0) -> tuple[RolloutBatch, dict[str, list[torch.Tensor]]]:
    """Synthetic step batch: random prompts/responses, rewards (one group all-equal), and the
    per-token noise that ``with_old_and_ref`` adds to the model's own logprobs to make theta' and
    the reference, so GRPO's ratios straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids, rewards = [], [], [], []
    for gi, k in enumerate(GROUP_SIZES):
        prompt = torch.randint(
            0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
        )
        for _ in range(k):
            n = int(torch.randint(1, 13, (1,), generator=g))
            prompts.append(prompt.tolist())
            responses.append(torch.randint(0, vocab, (n,), generator=g).tolist())
            gids.append(100 + 7 * gi)  # arbitrary, non-contiguous ids
            rewards.append(0.5 if gi == 2 else float(torch.rand((), generator=g)))
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    gids_t = torch.tensor(gids, dtype=torch.long)

    # Interleave samples of different groups so placement really moves them around.
    order = torch.randperm(len(prompts), generator=g).tolist()
    batch = RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=gids_t,
        rewards=rewards_t,
        advantages=group_advantages(rewards_t, gids_t),
        domains=torch.tensor([(g - 100) // 7 % 2 for g in gids]),  # two data domains
    ).select(order)

    def noise(scale: float) -> list[torch.Tensor]:
        return [scale * torch.randn(len(r), generator=g) for r in batch.response_ids]

    return batch, {"old_noise": noise(0.15), "ref_noise": noise(0.3)}


MASKED = ("gvpo_masked", "grpo_masked")  # the same losses on trajectories with observations


def with_loss_masks(batch: RolloutBatch, seed: int = 2) -> RolloutBatch:
    """The batch as multi-turn trajectories: a random loss mask per response (about a third of
    the tokens are observations; the first token is always the model's)."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for r in batch.response_ids:
        m = torch.rand(len(r), generator=g) > 0.35
        m[0] = True
        masks.append(m)
    return RolloutBatch(
        prompt_ids=batch.prompt_ids, response_ids=batch.response_ids, group_ids=batch.group_ids,
        rewards=batch.rewards, advantages=batch.advantages, domains=batch.domains,
        loss_masks=masks,
    )


def with_old_and_ref(batch: RolloutBatch, own: list[torch.Tensor], noise: dict) -> RolloutBatch:
    """theta' = own logprobs + old_noise, reference = own + ref_noise (per response token)."""
    batch.old_logprobs = [a + b for a, b in zip(own, noise["old_noise"], strict=True)]
    batch.ref_logprobs = [a + b for a, b in zip(own, noise["ref_noise"], strict=True)]
    return batch


# Preference pairs: the pair's domain (two domains, imbalanced), and the dataset sizes N_d.
PAIR_GROUPS = (0, 1, 0, 0, 1, 0, 0)
DATASET_SIZES = (90, 10)
PREFERENCE = ("dpo", "ipo", "gr_dpo", "gr_ipo")


def make_pair_batch(vocab: int, seed: int = 1) -> tuple[RolloutBatch, list[torch.Tensor]]:
    """Synthetic preference step: pair i is samples (chosen, +1) and (rejected, -1) with group id
    i (as ``trainer/preference.py`` lays pairs out), interleaved; and the per-token noise that
    makes the reference from the model's own logprobs."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids, signs, groups = [], [], [], [], []
    for i, grp in enumerate(PAIR_GROUPS):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        for sign in (1.0, -1.0):
            n = int(torch.randint(1, 13, (1,), generator=g))
            prompts.append(prompt.tolist())
            responses.append(torch.randint(0, vocab, (n,), generator=g).tolist())
            gids.append(i)
            signs.append(sign)
            groups.append(grp)
    order = torch.randperm(len(prompts), generator=g).tolist()
    batch = RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=torch.tensor(gids),
        rewards=torch.tensor(signs),
        domains=torch.tensor(groups),
    ).select(order)
    return batch, [0.5 * torch.randn(len(r), generator=g) for r in batch.response_ids]


def objective_for(name: str):
    """The registered objective, as ``algorithm=<name>`` builds it (two data domains)."""
    extra = {"gvpo": {"beta": BETA}, "gr_gvpo": {"beta": BETA, "robust_eta": 0.5}}
    extra |= {n: {"beta": 0.5} for n in PREFERENCE}
    # gr_dpo: the default (stratified) estimator; gr_ipo: the importance (Alg. 1) estimator
    extra["gr_dpo"] = {"beta": 0.5, "robust_eta": 0.05}
    extra["gr_ipo"] = {"beta": 0.5, "robust_eta": 0.05, "robust_estimator": "importance"}
    name = name.removesuffix("_masked")
    config = algorithm_config(name=name, **extra.get(name, {"ref_model": "synthetic"}))
    objective = build_objective(config, domains=["d0", "d1"])
    if name in PREFERENCE:
        objective.set_domain_sizes(DATASET_SIZES)
    return objective


def step_grads(ddp, optimizer, arch, batch, loss_name: str, budget: int, split: bool) -> dict:
    plan = plan_for(batch, budget, keep_groups_whole=not split)
    mbs = build_micro_batches(batch, plan)
    if loss_name == "gvpo_nostats":  # control: per-micro-batch group means (wrong when split)
        loss = GVPOMicroBatchLoss(BETA, num_counted_groups(batch.group_ids), None)
    else:
        objective = objective_for(loss_name)
        objective.prepare_round(batch)
        base = "ref_logprobs" if loss_name in PREFERENCE else "old_logprobs"
        ratio = partial(step_log_ratio, ddp, mbs, len(batch), 1.0, base)
        loss = objective.step_loss(StepInputs(batch, plan, mbs, ratio))
    ddp.zero_grad_buffer()
    forward_backward(ddp, mbs, loss)
    model = ddp.module
    grads = {n: p.main_grad for n, p in model.named_parameters()}
    optimizer.prepare_grads()  # the norm megatron clips by (what trainer.clip_grad acts on)
    info = {
        "micro_batches": len(mbs),
        "groups_whole": plan.groups_whole,
        "grad_norm": float(optimizer.get_grad_norm()),
    }
    optimizer.zero_grad()  # param.grad aliased main_grad: autograd would accumulate into it
    return gather_hf_tensors(model, arch, tensors=grads), info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--budget", type=int, default=4096, help="max tokens per micro-batch")
    p.add_argument("--split", action="store_true", help="let groups span micro-batches/ranks")
    p.add_argument(
        "--losses", default="gvpo,grpo,dapo,gr_gvpo", help="gvpo_nostats: a wrong variant (control)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    initialize(ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, seed=1))
    model, arch = build_from_hf(args.hf_dir, ModelConfig(precision="fp32"))
    ddp = wrap_with_ddp(model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.0), [ddp])
    batch, noise = make_batch(arch.vocab_size)
    plan = plan_for(batch, args.budget, keep_groups_whole=not args.split)
    batch = with_old_and_ref(batch, response_token_logprobs(ddp, batch, plan), noise)
    # theta' and the reference of the trajectories hold noise (garbage) on observation tokens
    masked = with_loss_masks(batch)
    masked = with_old_and_ref(masked, response_token_logprobs(ddp, masked, plan), noise)
    pairs, ref_noise = make_pair_batch(arch.vocab_size)
    own = response_token_logprobs(ddp, pairs, plan_for(pairs, args.budget, not args.split))
    pairs.ref_logprobs = [a + b for a, b in zip(own, ref_noise, strict=True)]
    out, infos = {}, {}
    for name in args.losses.split(","):
        b = pairs if name in PREFERENCE else masked if name in MASKED else batch
        grads, infos[name] = step_grads(ddp, optimizer, arch, b, name, args.budget, args.split)
        out.update({f"{name}/{k}": v.clone() for k, v in grads.items()})
    if is_rank0():
        save_file(out, args.out, metadata={k: json.dumps(v) for k, v in infos.items()})
    destroy()


if __name__ == "__main__":
    main()
