"""torchrun worker: vocab_parallel_logprobs on vocab-sharded logits vs a float64 single-rank reference.

Run by tests/test_logprobs.py as ``python -m torch.distributed.run --nproc_per_node 2 <this file>``.
Every rank builds the same full logits, keeps its vocabulary slice, and checks values and the
gradient of its slice. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_gvpo.parallel.logprobs import vocab_parallel_logprobs


def reference(full: torch.Tensor, target: torch.Tensor, true_vocab: int, temperature: float):
    """float64 log-probs and entropy of the full (padded) logits, padding columns sliced away."""
    lsm = torch.log_softmax(full[..., :true_vocab].double() / temperature, dim=-1)
    lp = lsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def run_case(
    group: dist.ProcessGroup,
    *,
    lead: tuple[int, ...],
    v_local: int,
    true_vocab: int,
    dtype: torch.dtype,
    temperature: float,
    chunk_size: int,
    entropy: bool,
    seed: int,
) -> list[str]:
    """One configuration; returns the list of mismatches seen on this rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(*lead, v_local * world, generator=gen, dtype=torch.float64) * 3).to(dtype)
    full[..., true_vocab:] = 1e4  # huge padding logits: must be masked
    target = torch.randint(0, true_vocab, lead, generator=gen)
    g_lp = torch.randn(lead, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(lead, generator=gen, dtype=torch.float64)

    # Reference on the same (already rounded) values, in float64.
    ref_in = full.double().requires_grad_(True)
    ref_lp, ref_ent = reference(ref_in, target, true_vocab, temperature)
    ref_obj = (ref_lp * g_lp).sum() + ((ref_ent * g_ent).sum() if entropy else 0.0)
    (ref_grad,) = torch.autograd.grad(ref_obj, ref_in)
    cols = slice(rank * v_local, (rank + 1) * v_local)

    shard = full[..., cols].clone().requires_grad_(True)
    out = vocab_parallel_logprobs(
        shard,
        target,
        tp_group=group,
        true_vocab_size=true_vocab,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=entropy,
    )
    lp, ent = out if entropy else (out, None)
    obj = (lp.double() * g_lp).sum()
    if ent is not None:
        obj = obj + (ent.double() * g_ent).sum()
    (grad,) = torch.autograd.grad(obj, shard)

    name = (
        f"rank{rank} {dtype} V_local={v_local} true={true_vocab} T={temperature} entropy={entropy}"
    )
    errors = []
    if grad.dtype != dtype or grad.shape != shard.shape:
        errors.append(f"{name}: grad {grad.dtype}{tuple(grad.shape)}")
    vtol = 1e-5  # values are computed in float32 from exactly the same inputs
    gtol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is rounded to the logits' dtype
    checks = [("logprobs", lp, ref_lp, vtol), ("grad", grad, ref_grad[..., cols], gtol)]
    if ent is not None:
        checks.append(("entropy", ent, ref_ent, vtol))
    for what, got, want, tol in checks:
        err = (got.double() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        if not err <= tol * scale:
            errors.append(f"{name}: {what} max abs error {err:.3g} > {tol * scale:.3g}")
    if not torch.all(grad[..., max(true_vocab - rank * v_local, 0) :] == 0):
        errors.append(f"{name}: nonzero gradient on padding columns")
    return errors


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    group = dist.new_group(list(range(dist.get_world_size())))
    torch.set_num_threads(1)
    errors: list[str] = []
    cases = [
        # rank 1 holds 22 real columns and 6 padding columns
        dict(lead=(3, 5), v_local=28, true_vocab=50, temperature=0.7, chunk_size=4, entropy=True),
        dict(lead=(3, 5), v_local=28, true_vocab=50, temperature=1.3, chunk_size=6, entropy=False),
        # rank 1 holds only padding columns
        dict(lead=(7,), v_local=16, true_vocab=13, temperature=0.9, chunk_size=3, entropy=True),
        # no padding, one chunk
        dict(
            lead=(2, 4), v_local=32, true_vocab=64, temperature=1.0, chunk_size=4096, entropy=True
        ),
    ]
    for i, case in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            errors += run_case(group, dtype=dtype, seed=1000 + i, **case)
    for e in errors:
        print("MISMATCH", e, flush=True)
    # Everyone reaches the same collectives; agree on the verdict before exiting.
    flag = torch.tensor([float(len(errors))])
    dist.all_reduce(flag)
    dist.destroy_process_group()
    if flag.item() == 0:
        print(f"rank ok: {len(cases) * 2} cases", flush=True)
    return 0 if flag.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
