"""Mixture-of-experts settings: how a routed-expert model (qwen3_moe) is built in megatron-core.

The router and experts are megatron-core's own (``TopKRouter``, ``SequentialMLP``, its token
dispatchers); this module only turns the HF architecture and ``model.moe.*`` into the
``TransformerConfig`` fields that make them compute what transformers computes:

- routing: softmax over all experts then top-k (HF ``Qwen3MoeTopKRouter``). With
  ``norm_topk_prob`` the top-k probabilities are renormalised, which equals megatron's
  top-k-then-softmax (``moe_router_pre_softmax=False``); without it, megatron's
  ``moe_router_pre_softmax=True`` keeps the unnormalised top-k of the full softmax.
- the router's GEMM and softmax in fp32 (``moe_router_dtype="fp32"``) whatever the model dtype;
- dropless: no expert capacity, no token dropping, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gvpo.models.hf_config import HFArch

DISPATCHERS = ("auto", "allgather", "alltoall")


@dataclass
class MoEConfig:
    """``model.moe.*``: training-time settings of a mixture-of-experts actor."""

    aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing loss (Switch-Transformer style, per layer, megatron's
    ``aux_loss``); 0 turns it off. With it on, its value per optimizer step depends on how the
    step's tokens are cut into micro-batches (it is computed per micro-batch)."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of the router logits); 0: off."""
    token_dispatcher: str = "auto"
    """How tokens reach their experts' ranks: allgather, alltoall, or auto (alltoall with CUDA,
    allgather on CPU, where gloo's all-to-all with uneven splits is not available)."""

    def validate(self) -> None:
        """Raise ValueError naming the ``model.moe`` key whose value is out of range."""
        if self.token_dispatcher not in DISPATCHERS:
            raise ValueError(
                f"model.moe.token_dispatcher={self.token_dispatcher!r}: use "
                f"{', '.join(DISPATCHERS)}"
            )
        for key in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.moe.{key}={getattr(self, key)} must be >= 0")

    def dispatcher(self) -> str:
        """The megatron-core token dispatcher this run uses."""
        if self.token_dispatcher != "auto":
            return self.token_dispatcher
        return "alltoall" if torch.cuda.is_available() else "allgather"


def moe_transformer_config_kwargs(arch: HFArch, moe: MoEConfig, ep: int, etp: int) -> dict:
    """``TransformerConfig`` fields for ``arch``'s experts (empty for a dense model)."""
    if not arch.is_moe:
        return {}
    moe.validate()
    aux = moe.aux_loss_coeff
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_layer_freq=list(arch.moe_layers),
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=moe.dispatcher(),
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_expert_capacity_factor=None,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def patch_router_gemm_without_te() -> None:
    """Let megatron-core's fp32 router GEMM run when Transformer Engine is absent.

    ``moe/moe_utils.py`` imports ``te_general_gemm`` inside a ``try`` that fails without TE and
    then tests ``te_general_gemm is not None`` in the router's autograd function: the name was
    never bound, a NameError. Binding it to None selects the module's own torch matmul path.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
