"""Mixture-of-experts settings: how a routed-expert model (qwen3_moe, qwen2_moe) is built in
megatron-core.

The router and experts are megatron-core's own (``TopKRouter``, ``SequentialMLP``, its token
dispatchers); this module only turns the HF architecture and ``model.moe.*`` into the
``TransformerConfig`` fields that make them compute what transformers computes:

- routing: softmax over all experts then top-k (HF ``Qwen3MoeTopKRouter``, and
  ``Qwen2MoeTopKRouter``, the same computation). With
  ``norm_topk_prob`` the top-k probabilities are renormalised, which equals megatron's
  top-k-then-softmax (``moe_router_pre_softmax=False``); without it, megatron's
  ``moe_router_pre_softmax=True`` keeps the unnormalised top-k of the full softmax.
- the router's GEMM and softmax in fp32 (``moe_router_dtype="fp32"``) whatever the model dtype;
- dropless: no expert capacity, no token dropping, no padding;
- qwen2_moe's shared expert: megatron-core's ``SharedExpertMLP`` (``moe_shared_expert_intermediate_size``)
  with its sigmoid gate (``moe_shared_expert_gate``: output x sigmoid(x . w), as HF's
  ``Qwen2MoeSparseMoeBlock`` scales the shared expert by ``sigmoid(shared_expert_gate(x))``),
  added to the routed experts' output.
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
    routing_replay: str = "off"
    """off; old: the round's theta' pass records each token's top-k experts and every update
    of the round routes the tokens the same way; rollout: the rollout engine reports the experts
    it chose for every token it processed, and the theta' pass and every update route the tokens
    as the engine did (``models/routing_replay.py``)."""

    def validate(self) -> None:
        """Raise ValueError naming the ``model.moe`` key whose value is out of range."""
        if self.token_dispatcher not in DISPATCHERS:
            raise ValueError(
                f"model.moe.token_dispatcher={self.token_dispatcher!r}: use "
                f"{', '.join(DISPATCHERS)}"
            )
        if self.routing_replay not in ("off", "old", "rollout"):
            raise ValueError(
                f"model.moe.routing_replay={self.routing_replay!r}: use off, old or rollout"
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
        moe_enable_routing_replay=moe.routing_replay != "off",
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=arch.shared_expert_ffn_hidden_size > 0,
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


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class RouterStats:
    """Per-layer expert load of the micro-batches run since :meth:`reset`, and the router losses.

    A forward hook on each of megatron's routers adds up its routing map (tokens this rank routed
    to each expert, padding positions included). :meth:`metrics` (collective over every rank)
    sums the counts over ranks and reports, per MoE layer ``L``, ``moe/layer_L/tokens_max`` and
    ``moe/layer_L/tokens_mean`` (tokens per expert) and over all layers ``moe/load_max_over_mean``
    (1 = perfectly balanced), plus ``moe/aux_loss`` and ``moe/z_loss`` (not multiplied by their
    coefficients; the mean over ranks, layers and micro-batches) when they are on. Routing is dropless:
    no token is ever dropped, so there is no dropped-token count.
    """

    def __init__(self, model: torch.nn.Module, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.layer_passes = 0  # router calls on this rank (micro-batches x its MoE layers)
        for router in _routers(model):
            router.register_forward_hook(self._hook)

    def _hook(self, router, args, output) -> None:
        _, routing_map = output
        self.counts[router.layer_number - 1] += routing_map.detach().sum(0).to("cpu", torch.float64)
        self.layer_passes += 1

    def reset(self) -> None:
        """Forget what earlier passes routed (and megatron's router-loss tracker)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.counts.zero_()
        self.layer_passes = 0
        clear_aux_losses_tracker()

    def metrics(self) -> dict[str, float]:
        """Load and router-loss figures of the passes since :meth:`reset` (every rank calls it)."""
        import torch.distributed as dist
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        counts = self.counts.clone()
        losses = {}
        for key, name in (("moe/aux_loss", "load_balancing_loss"), ("moe/z_loss", "z_loss")):
            values = get_moe_layer_wise_logging_tracker().get(name, {}).get("values")
            if values is not None:
                losses[key] = values.detach().to("cpu", torch.float64)
        loss_keys = sorted(losses)
        passes = torch.tensor([float(self.layer_passes)], dtype=torch.float64)
        packed = torch.cat([counts.flatten(), passes] + [losses[k] for k in loss_keys])
        if dist.is_initialized() and dist.get_world_size() > 1:
            from megatron_gvpo.parallel.initialize import device

            packed = packed.to(device())
            dist.all_reduce(packed)
            packed = packed.cpu()
        counts = packed[: counts.numel()].view_as(counts)
        out: dict[str, float] = {}
        ratios = []
        for layer in range(self.num_layers):
            row = counts[layer]
            if not row.any():
                continue
            mean = float(row.mean())
            out[f"moe/layer_{layer}/tokens_max"] = float(row.max())
            out[f"moe/layer_{layer}/tokens_mean"] = mean
            ratios.append(float(row.max()) / mean)
        if ratios:
            out["moe/load_max_over_mean"] = max(ratios)
        n = counts.numel()
        total_passes = max(1.0, float(packed[n]))
        for i, key in enumerate(loss_keys):
            # mean over (rank, layer, micro-batch) of each router call's loss
            start = n + 1 + i * self.num_layers
            out[key] = float(packed[start : start + self.num_layers].sum()) / total_passes
        return out


class AuxLossScale:
    """Scale the router losses' gradients to a step-wide token mean.

    With ``calculate_per_token_loss`` megatron-core backpropagates each micro-batch's router loss
    multiplied by its token count and expects ``finalize_model_grads`` to divide every gradient by
    the step's token count. This trainer's losses arrive already normalised for the whole step,
    so nothing is divided there; instead the router losses' backward scale
    (``MoEAuxLossAutoScaler``, which megatron's schedule sets to 1 before every backward) is
    multiplied by 1 / (tokens of the step over every DP rank) while the step runs. The step's
    router-loss term is then coeff x the token-weighted mean of the micro-batches' router losses.
    """

    def __init__(self, step_tokens: int):
        self.factor = 1.0 / max(1, step_tokens)
        self._original = None

    def __enter__(self) -> AuxLossScale:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        original = MoEAuxLossAutoScaler.set_loss_scale
        factor = self.factor

        def set_loss_scale(scale: torch.Tensor) -> None:
            original(scale * factor)

        self._original = original
        MoEAuxLossAutoScaler.set_loss_scale = staticmethod(set_loss_scale)
        return self

    def __exit__(self, *exc) -> None:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale = staticmethod(self._original)
