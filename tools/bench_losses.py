"""Cost of the GVPO loss and its DP exchange against one training step of the tiny model.

    python tools/bench_losses.py [--num-sequences 4096 --group-size 8 --dp 2]

Spawns ``--dp`` CPU ranks (gloo), or runs under torchrun. On one synthetic step batch
(``num_sequences`` responses in groups of ``group_size``), each rank times, median of
``--repeats``:

- ``loss_s``: the step-wide group statistics (the sum all-reduce over DP of per-sample s and s',
  then ``gvpo_group_stats``) plus ``GVPOMicroBatchLoss`` and its backward to the logprobs on every
  micro-batch: everything GVPO adds to a step beyond the model;
- ``step_s``: one training step: megatron ``forward_backward`` over the same micro-batches with
  the GVPO loss, DDP gradient reduction included;
- ``stats_forward_s``: the detached forward pass that gives s when a group spans micro-batches
  (not needed when groups are whole, the default placement, nor on a round's first step).

Prints one JSON line with the slowest rank's times and ``loss_fraction = loss_s / step_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gvpo.algorithms.gvpo import gvpo_group_stats, num_counted_groups  # noqa: E402
from megatron_gvpo.models.forward import (  # noqa: E402
    forward_backward,  # noqa: E402
    sequence_logprobs,
    step_log_ratio,
    sum_over_dp,
)
from megatron_gvpo.models.gpt import ModelConfig, build_gpt_model  # noqa: E402
from megatron_gvpo.models.hf_config import arch_from_dict  # noqa: E402
from megatron_gvpo.models.tiny import tiny_hf_config  # noqa: E402
from megatron_gvpo.parallel.ddp import wrap_with_ddp  # noqa: E402
from megatron_gvpo.parallel.initialize import (  # noqa: E402
    ParallelConfig,
    destroy,
    device,
    initialize,
)
from megatron_gvpo.parallel.launch import is_rank0, run_on_ranks  # noqa: E402
from megatron_gvpo.trainer.batch import (  # noqa: E402
    RolloutBatch,
    build_micro_batches,
    plan_for,
)
from megatron_gvpo.trainer.objectives.gvpo import GVPOMicroBatchLoss  # noqa: E402

BETA = 0.1


def make_batch(args, vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    n = args.num_sequences
    prompts, responses = [], []
    for i in range(n):
        if i % args.group_size == 0:
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
        length = int(
            torch.randint(args.response_len // 2, args.response_len + 1, (1,), generator=g)
        )
        prompts.append(prompt)
        responses.append(torch.randint(0, vocab, (length,), generator=g).tolist())
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=torch.arange(n) // args.group_size,
        rewards=torch.rand(n, generator=g),
        old_logprobs=[-3.0 - torch.rand(len(r), generator=g) for r in responses],
    )


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loss_only(mbs, batch, fake_logprobs) -> None:
    """What GVPO adds to a step: the DP exchange, group statistics, the loss and its backward."""
    s = torch.zeros(2, len(batch), dtype=torch.float64)
    for lp, mb in zip(fake_logprobs, mbs, strict=True):
        s[0, mb.extra["sample_ids"]] = sequence_logprobs(lp.detach(), mb).double()
        s[1, mb.extra["sample_ids"]] = mb.extra["old_logprobs"].double().sum(-1)
    s = sum_over_dp(s, device())
    stats = gvpo_group_stats(s[0], s[1], batch.rewards.double(), batch.group_ids, BETA)
    loss_fn = GVPOMicroBatchLoss(BETA, num_counted_groups(batch.group_ids), stats)
    for lp, mb in zip(fake_logprobs, mbs, strict=True):
        loss, _ = loss_fn(lp, None, mb)
        loss.backward()


def worker(args) -> None:
    initialize(ParallelConfig(tp=1, pp=1, seed=0))
    torch.set_num_threads(args.threads)
    arch = arch_from_dict(tiny_hf_config(args.family).to_dict())
    model = build_gpt_model(arch, ModelConfig(precision="fp32"), perform_initialization=True)
    ddp = wrap_with_ddp(model)
    batch = make_batch(args, arch.vocab_size)
    plan = plan_for(batch, args.max_tokens_per_microbatch)
    mbs = build_micro_batches(batch, plan)
    fake = [
        torch.randn(1, plan.seq_len - 1, requires_grad=True)
        .log_softmax(-1)
        .detach()
        .requires_grad_()
        for _ in mbs
    ]
    loss_fn = GVPOMicroBatchLoss(BETA, num_counted_groups(batch.group_ids))

    def train_step():
        ddp.zero_grad_buffer()
        forward_backward(ddp, mbs, loss_fn)
        ddp.finish_grad_sync()

    def stats_forward():
        ratio = step_log_ratio(ddp, mbs, len(batch), 1.0, "old_logprobs")
        gvpo_group_stats(ratio, torch.zeros_like(ratio), batch.rewards.double(), batch.group_ids, BETA)

    local = {
        "loss_s": _timed(lambda: loss_only(mbs, batch, fake), args.repeats),
        "step_s": _timed(train_step, args.repeats),
        "stats_forward_s": _timed(stats_forward, args.repeats),
    }
    worst = {}
    for k, v in local.items():
        t = torch.tensor([v], dtype=torch.float64, device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst[k] = t.item()
    if is_rank0():
        tokens = sum(batch.lengths)
        print(
            json.dumps(
                {
                    **{k: round(v, 5) for k, v in worst.items()},
                    "loss_fraction": round(worst["loss_s"] / worst["step_s"], 5),
                    "num_sequences": len(batch),
                    "group_size": args.group_size,
                    "tokens": tokens,
                    "micro_batches_per_rank": len(mbs),
                    "dp": dist.get_world_size(),
                    "family": args.family,
                    "threads_per_rank": args.threads,
                }
            ),
            flush=True,
        )
    destroy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-sequences", type=int, default=4096)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=48, help="max; lengths are L/2..L")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=8192)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--family", default="qwen2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    run_on_ranks(worker, args.dp, args)


if __name__ == "__main__":
    main()
