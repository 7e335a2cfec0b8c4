"""torchrun worker (1 rank): the router's gradient from megatron-core's load-balancing loss alone.

Run by tests/test_moe.py as ``python -m torch.distributed.run --nproc_per_node 1 <this file>
--hf-dir H --coeff C --out O``. Two micro-batches go through the real training path
(``forward_backward``, megatron DDP) with the policy loss multiplied by zero, so the router
weight's gradient is the router loss's alone. Saves it with every micro-batch's router input, so
the test can rebuild the loss in float64 from megatron-core's documented formula.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.models.forward import MicroBatch, forward_backward
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.models.moe import MoEConfig, _routers
from megatron_gvpo.parallel.ddp import wrap_with_ddp
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--coeff", type=float, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    initialize(ParallelConfig(seed=1))
    cfg = ModelConfig(precision="fp32", moe=MoEConfig(aux_loss_coeff=args.coeff))
    model, arch = build_from_hf(args.hf_dir, cfg)
    (router,) = _routers(model)
    inputs = []
    router.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().clone()))
    ddp = wrap_with_ddp(model)
    ddp.zero_grad_buffer()
    g = torch.Generator().manual_seed(3)
    mbs = [MicroBatch(tokens=torch.randint(0, arch.vocab_size, (2, 12), generator=g)) for _ in "ab"]
    forward_backward(ddp, mbs, lambda lp, ent, mb: (0.0 * lp.sum(), {}))
    out = {"grad": router.weight.main_grad.detach().clone(), "weight": router.weight.detach()}
    for i, x in enumerate(inputs):
        out[f"input.{i}"] = x.reshape(-1, x.shape[-1])
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    destroy()


if __name__ == "__main__":
    main()
