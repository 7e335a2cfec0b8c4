"""Worker: theta' logprobs taken from a round's only update's forward vs a separate pass.

Run by tests/test_fast_paths.py as ``python <this file> --hf-dir H --budget B --out J`` (one rank).
On the synthetic step batch of ``loss_layout_worker``: (a) the separate forward-only pass
(``response_token_logprobs``), (b) ``ThetaPrime``'s ``first_update`` around GRPO's micro-batch loss in a
training forward/backward, (c) GRPO's gradient with old logprobs from (a), (d) a control with old
logprobs that are not theta''s. Writes the differences as JSON; transformers scores the same
tokens for an independent reference.
"""

from __future__ import annotations

import argparse
import json

import torch
from loss_layout_worker import make_batch

from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.models.forward import forward_backward
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize
from megatron_gvpo.parallel.launch import run_on_ranks
from megatron_gvpo.trainer.batch import (
    Packing,
    ThetaPrime,
    build_micro_batches,
    plan_for,
    response_token_logprobs,
)
from megatron_gvpo.trainer.objectives import StepInputs, algorithm_config, build_objective


def grpo_grads(ddp, batch, plan, wrap: bool):
    """GRPO's step gradient (flat) and, with ``wrap``, the old logprobs its forward filled in."""
    mbs = build_micro_batches(batch, plan)
    objective = build_objective(algorithm_config(name="grpo", kl_beta=0.0))  # no reference
    objective.prepare_round(batch)
    loss = objective.step_loss(StepInputs(batch, plan, mbs, None))
    theta_prime = ThetaPrime(ddp, 1.0, 1, Packing(4096))  # theta' from the update itself
    if wrap:
        loss = theta_prime.update_loss(loss, batch)
    ddp.zero_grad_buffer()
    forward_backward(ddp, mbs, loss)
    grad = torch.cat([p.main_grad.flatten().clone() for p in ddp.module.parameters()])
    if not wrap:
        return grad, None
    theta_prime.after_update(loss, batch, batch)
    return grad, batch.old_logprobs


def hf_logprobs(hf_dir: str, batch) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True):
            ids = torch.tensor([p + r])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            tgt = ids[0, 1:]
            out.append(logp.gather(1, tgt[:, None])[:, 0][len(p) - 1 :])
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--out", required=True)
    run_on_ranks(run, 1, p.parse_args())


def run(args) -> None:
    initialize(ParallelConfig(tp=1, pp=1, seed=1))
    model, arch = build_from_hf(args.hf_dir, ModelConfig(precision="fp32"))
    ddp = wrap_with_ddp(model)
    batch, noise = make_batch(arch.vocab_size)
    plan = plan_for(batch, args.budget)

    separate = response_token_logprobs(ddp, batch, plan)
    batch.old_logprobs = None
    grad_fill, filled = grpo_grads(ddp, batch, plan, wrap=True)
    batch.old_logprobs = separate
    grad_sep, _ = grpo_grads(ddp, batch, plan, wrap=False)
    batch.old_logprobs = [a + b for a, b in zip(separate, noise["old_noise"], strict=True)]
    grad_ctrl, _ = grpo_grads(ddp, batch, plan, wrap=False)

    scale = float(grad_sep.abs().max())
    result = {
        "micro_batches": plan.num_micro_batches,
        "samples": len(batch),
        "filled_vs_separate": max_diff(filled, separate),
        "filled_vs_transformers": max_diff(filled, hf_logprobs(args.hf_dir, batch)),
        "grad_rel_diff": float((grad_fill - grad_sep).abs().max()) / scale,
        "control_grad_rel_diff": float((grad_ctrl - grad_sep).abs().max()) / scale,
        "grad_scale": scale,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    destroy()


if __name__ == "__main__":
    main()
