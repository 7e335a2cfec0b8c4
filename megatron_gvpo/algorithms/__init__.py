"""Losses as pure tensor functions (torch only): GVPO, the GRPO family, Group-Robust PO, KL;
the GRPO family's config, which is also its ``algorithm.*`` schema."""

from megatron_gvpo.algorithms.config import AlgorithmConfig
from megatron_gvpo.algorithms.group_robust import (
    GroupRobustWeights,
    domain_estimates,
    domain_robust_gvpo_loss,
    unit_weights,
)
from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
    dapo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    gspo_loss,
    overlong_penalty,
    policy_loss,
)
from megatron_gvpo.algorithms.gvpo import (
    GVPOGroupStats,
    gvpo_group_stats,
    gvpo_loss,
    gvpo_loss_terms,
)
from megatron_gvpo.algorithms.kl import kl_estimate, kl_k1, kl_k2, kl_k3

__all__ = [
    "AlgorithmConfig",
    "DAPOConfig",
    "DrGRPOConfig",
    "GRPOConfig",
    "GSPOConfig",
    "GVPOGroupStats",
    "GroupRobustWeights",
    "PolicyLossConfig",
    "dapo_loss",
    "domain_estimates",
    "domain_robust_gvpo_loss",
    "dr_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "gvpo_group_stats",
    "gvpo_loss",
    "gvpo_loss_terms",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "overlong_penalty",
    "policy_loss",
    "unit_weights",
]
