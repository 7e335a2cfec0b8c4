"""GPU worker: a tiny GPTModel under FP8 (Transformer Engine) runs forward and backward.

Run by tests/test_fp8_config.py as ``python <this file> --hf-dir H`` on a CUDA machine with TE.
For every recipe this GPU and TE support, the FP8 model's logprobs must be finite and close to the
bf16 model's on the same weights, and a backward pass must give finite gradients.
"""

from __future__ import annotations

import argparse

import torch

from megatron_gvpo.bridge.loader import build_from_hf
from megatron_gvpo.models.forward import MicroBatch, compute_logprobs
from megatron_gvpo.models.fp8 import RECIPES, FP8Config
from megatron_gvpo.models.gpt import ModelConfig
from megatron_gvpo.parallel.initialize import ParallelConfig, destroy, initialize

SEQ = 64  # FP8 GEMMs need token counts divisible by 16


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    args = p.parse_args()
    initialize(ParallelConfig())
    torch.manual_seed(0)
    tokens = torch.randint(0, 250, (1, SEQ))
    mb = MicroBatch(tokens=tokens)
    ref_model, _ = build_from_hf(args.hf_dir, ModelConfig(precision="bf16"))
    (ref,) = compute_logprobs(ref_model, [mb])
    del ref_model
    ran = []
    for recipe in RECIPES:
        cfg = FP8Config(enabled=True, recipe=recipe)
        try:
            cfg.validate("bf16", "transformer_engine")
        except RuntimeError as e:
            print(f"skip {recipe}: {e}", flush=True)
            continue
        model, _ = build_from_hf(
            args.hf_dir,
            ModelConfig(precision="bf16", transformer_impl="transformer_engine", fp8=cfg),
        )
        assert model.config.fp8 == "hybrid" and model.config.fp8_recipe == recipe
        for _ in range(3):  # delayed scaling needs a few steps of amax history
            (lp,) = compute_logprobs(model, [mb])
        assert torch.isfinite(lp).all(), recipe
        err = (lp.float() - ref.float()).abs().max().item()
        print(f"{recipe}: max |logprob fp8 - bf16| = {err:.4f}", flush=True)
        assert err < 0.5, (recipe, err)
        pos = torch.arange(SEQ, device=lp.device).unsqueeze(0)
        logits = model(tokens.to(lp.device), pos, attention_mask=None)
        logits.float().square().mean().backward()
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        grads += [
            q.main_grad for q in model.parameters() if getattr(q, "main_grad", None) is not None
        ]
        assert grads and all(torch.isfinite(g).all() for g in grads), recipe
        ran.append(recipe)
        del model
    assert ran, "no FP8 recipe is supported here"
    destroy()
    print(f"fp8 forward ok: {', '.join(ran)}", flush=True)


if __name__ == "__main__":
    main()
