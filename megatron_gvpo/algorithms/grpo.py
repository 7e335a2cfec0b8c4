"""The GRPO family as pure tensor losses: GRPO, Dr.GRPO, DAPO, GSPO.

(One module for the four: they share the clipped surrogate, the KL term and the normalisers below,
and differ only in aggregation, so the table below is their whole specification.)

Token-level inputs are ``[B, T]`` tensors aligned on response tokens: ``logprobs`` (theta, with
grad), ``old_logprobs`` (the sampling policy), optional ``ref_logprobs`` (frozen reference) and a
``response_mask`` (bool or 0/1) that is true on response tokens. Values at masked-out positions are
ignored (they may be anything finite or not). ``advantages`` are per sequence ``[B]`` (broadcast
over tokens) or per token ``[B, T]``; ``group_advantages`` builds them from rewards.

With ``r_t = exp(logp_t - old_t)`` and advantage ``A``, the clipped per-token surrogate loss is
``-min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)``, plus ``kl_beta * k(logp_t, ref_t)`` when
``kl_beta > 0`` (``k`` from ``kl.py``, k3 by default). The families differ in aggregation:

========  ==========================================================  =========================
loss      aggregation of per-token loss ``l_bt`` (m = mask)           normaliser argument
========  ==========================================================  =========================
GRPO      ``(1/S) sum_b (sum_t m l_bt) / (sum_t m_bt)``                ``num_sequences`` = S
Dr.GRPO   ``sum_{b,t} m l_bt / (S * max_len)``                         ``num_sequences`` = S
DAPO      ``sum_{b,t} m l_bt / N_tok``                                 ``num_tokens`` = N_tok
GSPO      ``(1/S) sum_b -min(s_b A_b, clip(s_b) A_b)``,                ``num_sequences`` = S
          ``s_b = exp(mean_t (logp - old))`` (sequence-level ratio)
========  ==========================================================  =========================

Split / distributed use: every loss is a plain sum over sequences (GRPO, Dr.GRPO, GSPO) or tokens
(DAPO) divided by a normaliser. Pass the normaliser of the *whole step batch* (global number of
sequences with at least one response token, or global number of response tokens, over all
micro-batches and DP ranks); then the sum of the per-micro-batch losses over micro-batches and ranks
equals the loss of the full batch, value and gradient. Left as ``None`` the normaliser is the local
one (sequences with at least one response token, or response tokens, of this call), which is the
full-batch loss when the call sees the whole batch. For Dr.GRPO set ``max_len`` (the generation
length limit) explicitly in split use: its default is this call's ``T``, which may differ between
micro-batches.

Truncated importance sampling (TIS, off by default): when the sampling engine's own logprobs
``rollout_logprobs`` are given and ``config.tis_clip`` is set, each token's surrogate loss is
multiplied by the detached weight ``w_t = min(exp(old_t - rollout_t), tis_clip)``: the ratio of
theta' (the actor's recomputed logprob of the sampled token) to the engine's, truncated above, as
slime's ``--use-tis``/``--tis-clip`` and verl's token-level rollout IS do. GSPO uses the
sequence-level weight ``min(exp(mean_t (old - rollout)), tis_clip)``, matching its ratio. The
KL term is not weighted. Diagnostics ``tis_mean``, ``tis_max`` and ``tis_clip_fraction`` (share of
weights cut at ``tis_clip``) are added.

Diagnostics (detached 0-dim tensors, over this call's response tokens, or sequences for GSPO):
``pg_loss`` and ``kl_loss`` (the two parts of ``loss``), ``clip_fraction`` (share of tokens whose
surrogate takes the clipped branch, i.e. whose gradient is cut: ``A > 0, r > 1 + eps_high`` or
``A < 0, r < 1 - eps_low``), ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``kl_mean`` (mean
per-token KL estimate, when ``ref_logprobs`` is given), ``num_tokens``, ``num_sequences``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_gvpo.algorithms._groups import check_group_ids, group_index, group_sum
from megatron_gvpo.algorithms.kl import KL_ESTIMATORS, kl_estimate

__all__ = [
    "DAPOConfig",
    "DrGRPOConfig",
    "GRPOConfig",
    "GSPOConfig",
    "PolicyLossConfig",
    "dapo_loss",
    "dr_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "nonconstant_group_mask",
    "overlong_penalty",
]


# --------------------------------------------------------------------------------------- configs


def _finite_number(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class PolicyLossConfig:
    """Clipping and KL settings shared by the family.

    Attributes:
        eps_low: lower clip, ratio >= 1 - eps_low; in [0, 1).
        eps_high: upper clip, ratio <= 1 + eps_high; >= eps_low. ``None``: equal to ``eps_low``.
        kl_beta: weight of the KL-to-reference term (0 disables it; > 0 needs ``ref_logprobs``).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see ``kl.py``).
        tis_clip: truncation C of the rollout importance weight (``None``: no TIS); > 0.
    """

    eps_low: float = 0.2
    eps_high: float | None = None
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    tis_clip: float | None = None

    def __post_init__(self) -> None:
        eps_low = _finite_number("eps_low", self.eps_low)
        if eps_low < 0 or eps_low >= 1:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low!r}")
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", eps_low)
        eps_high = _finite_number("eps_high", self.eps_high)
        if eps_high < 0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high!r}")
        if eps_high < eps_low:
            raise ValueError(f"eps_high ({eps_high}) must be >= eps_low ({eps_low})")
        kl_beta = _finite_number("kl_beta", self.kl_beta)
        if kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}"
            )
        if self.tis_clip is not None:
            tis_clip = _finite_number("tis_clip", self.tis_clip)
            if tis_clip <= 0:
                raise ValueError(f"tis_clip must be > 0, got {self.tis_clip!r}")
            object.__setattr__(self, "tis_clip", tis_clip)
        object.__setattr__(self, "eps_low", eps_low)
        object.__setattr__(self, "eps_high", eps_high)
        object.__setattr__(self, "kl_beta", kl_beta)


@dataclass(frozen=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO (DeepSeekMath): symmetric clip 0.2, k3 KL to the reference with beta 0.04."""

    eps_low: float = 0.2
    eps_high: float | None = None
    kl_beta: float = 0.04


@dataclass(frozen=True)
class DrGRPOConfig(PolicyLossConfig):
    """Dr.GRPO: no KL by default; ``max_len`` is the constant length normaliser (the generation
    limit). ``None``: the ``T`` of the tensors given to each call."""

    kl_beta: float = 0.0
    max_len: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_len is not None and (
            isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1
        ):
            raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")


@dataclass(frozen=True)
class DAPOConfig(PolicyLossConfig):
    """DAPO: clip-higher (0.2 / 0.28), no KL."""

    eps_low: float = 0.2
    eps_high: float | None = 0.28
    kl_beta: float = 0.0


@dataclass(frozen=True)
class GSPOConfig(PolicyLossConfig):
    """GSPO: sequence-level ratio; the paper's clip ranges are 3e-4 / 4e-4; no KL."""

    eps_low: float = 3e-4
    eps_high: float | None = 4e-4
    kl_beta: float = 0.0


# ----------------------------------------------------------------------------- rewards helpers


@torch.no_grad()
def group_advantages(
    rewards: Tensor, group_ids: Tensor, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages ``[N]``: ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    ``std_g`` is the sample standard deviation (Bessel's correction, divisor ``k - 1``);
    ``normalize_std=False`` (Dr.GRPO) gives ``R_i - mean_g R``. Samples of size-1 groups get 0.
    Returned detached, in at least float32.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    ids = check_group_ids(group_ids, rewards.numel())
    eps = _finite_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.detach().to(dtype)
    _, inverse, counts = group_index(ids.to(r.device))
    g = counts.numel()
    k = counts.to(dtype)
    mean = group_sum(r, inverse, g) / k
    centered = r - mean[inverse]
    if not normalize_std:
        return centered
    var = group_sum(centered.square(), inverse, g) / (k - 1).clamp(min=1)
    std = var.sqrt()[inverse]
    adv = centered / (std + eps)
    return torch.where(counts[inverse] >= 2, adv, torch.zeros_like(adv))


@torch.no_grad()
def nonconstant_group_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling: bool ``[N]``, true for samples whose group's rewards are not all
    equal (groups with zero reward variance give GRPO/DAPO no gradient and are filtered out)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    ids = check_group_ids(group_ids, rewards.numel())
    _, inverse, counts = group_index(ids.to(rewards.device))
    g = counts.numel()
    gmax = torch.full((g,), -math.inf, dtype=rewards.dtype, device=rewards.device)
    gmin = torch.full((g,), math.inf, dtype=rewards.dtype, device=rewards.device)
    gmax = gmax.scatter_reduce(0, inverse, rewards, reduce="amax")
    gmin = gmin.scatter_reduce(0, inverse, rewards, reduce="amin")
    return (gmax > gmin)[inverse]


@torch.no_grad()
def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment, a reward term per response of length ``L``::

        0                                    if L <= max_len - cache_len
        ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
        -1                                   if L > max_len

    ``0 <= cache_len <= max_len`` (``cache_len == 0``: a hard -1 beyond ``max_len``). Returns a
    float tensor shaped like ``lengths`` (float32, or float64 for float64 lengths).
    """
    if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if isinstance(cache_len, bool) or int(cache_len) != cache_len or cache_len < 0:
        raise ValueError(f"cache_len must be an int >= 0, got {cache_len!r}")
    if cache_len > max_len:
        raise ValueError(f"cache_len ({cache_len}) must be <= max_len ({max_len})")
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    length = lengths.to(dtype)
    soft_start = float(max_len - cache_len)
    ramp = (soft_start - length) / float(max(cache_len, 1))
    out = torch.where(length <= soft_start, torch.zeros_like(length), ramp)
    return torch.where(length > max_len, torch.full_like(length, -1.0), out)


# ------------------------------------------------------------------------------------ internals


def _prepare(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None,
    config: PolicyLossConfig,
    *,
    token_advantages_ok: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Validate; return ``(mask, logprobs, log_ratio, adv, ref or None)``, all ``[B, T]`` except
    ``adv`` (``[B]`` or ``[B, T]``); masked positions of the token tensors hold 0."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("response_mask", response_mask)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if ref_logprobs is not None and ref_logprobs.shape != shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {shape}")
    if config.kl_beta > 0 and ref_logprobs is None:
        raise ValueError(
            f"kl_beta={config.kl_beta} > 0 needs ref_logprobs (got None); "
            "pass ref_logprobs or set kl_beta=0"
        )
    b = shape[0]
    if advantages.shape == (b,):
        pass
    elif advantages.shape == shape and token_advantages_ok:
        pass
    else:
        want = "[B]" if not token_advantages_ok else "[B] or [B, T]"
        raise ValueError(f"advantages must be {want}, got shape {tuple(advantages.shape)}")
    mask = response_mask.to(device=logprobs.device, dtype=torch.bool)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Masked positions may hold padding garbage (inf, nan): replace them by 0 before any
    # arithmetic, so that neither the values nor the gradients (0 * nan) can be poisoned.
    lp = torch.where(mask, logprobs.to(dtype), zero)
    old = torch.where(mask, old_logprobs.detach().to(device=lp.device, dtype=dtype), zero)
    adv = advantages.detach().to(device=lp.device, dtype=dtype)
    if adv.dim() == 2:
        adv = torch.where(mask, adv, zero)
    ref = None
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.detach().to(device=lp.device, dtype=dtype), zero)
    return mask, lp, lp - old, adv, ref


def _normalizer(name: str, value: float | int | Tensor | None, default: Tensor) -> Tensor:
    if value is None:
        return default.clamp(min=1)
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return torch.tensor(max(v, 1.0), dtype=default.dtype, device=default.device)


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """``(loss, clipped)``: ``-min(r A, clip(r) A)`` and where the clipped branch is taken."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def _tis_log_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor | None, mask: Tensor, config: PolicyLossConfig
) -> Tensor | None:
    """Per-token ``old - rollout`` (0 where masked), or None when TIS is off."""
    if config.tis_clip is None:
        return None
    if rollout_logprobs is None:
        raise ValueError(
            f"tis_clip={config.tis_clip} needs rollout_logprobs (the engine's logprobs); got None"
        )
    if rollout_logprobs.shape != mask.shape:
        raise ValueError(
            f"rollout_logprobs has shape {tuple(rollout_logprobs.shape)}, expected "
            f"{tuple(mask.shape)}"
        )
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    old = torch.where(mask, old_logprobs.detach().to(device=mask.device, dtype=dtype), zero)
    eng = torch.where(mask, rollout_logprobs.detach().to(device=mask.device, dtype=dtype), zero)
    return old - eng


def _tis_weights(log_w: Tensor, valid: Tensor, tis_clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached ``min(exp(log_w), tis_clip)`` and its diagnostics over ``valid`` entries."""
    with torch.no_grad():
        raw = torch.exp(log_w)
        w = raw.clamp(max=tis_clip)
        picked, n = w[valid], int(valid.sum())
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        diag = {
            "tis_mean": picked.mean() if n else zero + 1,
            "tis_max": picked.max() if n else zero + 1,
            "tis_clip_fraction": (raw[valid] > tis_clip).to(w.dtype).mean() if n else zero,
        }
    return w, diag


def _token_level(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None,
    config: PolicyLossConfig,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Per-token ``(pg, kl or None, mask, ratio, clipped, tis diagnostics)``; pg and kl hold 0
    where masked; pg carries the TIS weight when ``config.tis_clip`` is set."""
    mask, lp, log_ratio, adv, ref = _prepare(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, config
    )
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    pg, clipped = _clipped_surrogate(ratio, adv, config.eps_low, config.eps_high)
    tis_diag: dict[str, Tensor] = {}
    log_w = _tis_log_weights(old_logprobs, rollout_logprobs, mask, config)
    if log_w is not None:
        w, tis_diag = _tis_weights(log_w, mask, config.tis_clip)
        pg = pg * w.to(pg.dtype)
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    pg = torch.where(mask, pg, zero)
    kl = None
    if ref is not None:
        kl = torch.where(mask, kl_estimate(lp, ref, config.kl_estimator), zero)
    return pg, kl, mask, ratio, clipped & mask, tis_diag


def _ratio_diag(ratio: Tensor, clipped: Tensor, valid: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        r = ratio.detach()[valid]
        n = r.numel()
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        return {
            "clip_fraction": clipped[valid].to(ratio.dtype).mean() if n else one * 0,
            "ratio_mean": r.mean() if n else one,
            "ratio_min": r.min() if n else one,
            "ratio_max": r.max() if n else one,
        }


def _finish(
    pg_sum: Tensor,
    kl_sum: Tensor | None,
    norm: Tensor,
    config: PolicyLossConfig,
    diag: dict[str, Tensor],
    kl_tokens: Tensor | None,
    mask: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    pg_loss = pg_sum / norm
    loss = pg_loss
    if kl_sum is not None and config.kl_beta > 0:
        kl_loss = config.kl_beta * (kl_sum / norm)
        loss = loss + kl_loss
    else:
        kl_loss = torch.zeros((), dtype=pg_sum.dtype, device=pg_sum.device)
    with torch.no_grad():
        diag["pg_loss"] = pg_loss.detach()
        diag["kl_loss"] = kl_loss.detach()
        if kl_tokens is not None:
            diag["kl_mean"] = kl_tokens.detach().sum() / mask.sum().clamp(min=1)
        diag["num_tokens"] = mask.sum().to(pg_sum.dtype)
        diag["num_sequences"] = mask.any(dim=1).sum().to(pg_sum.dtype)
    return loss, diag


# --------------------------------------------------------------------------------------- losses


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: GRPOConfig | PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_sequences: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (DeepSeekMath): per-sequence token mean of the clipped surrogate (+ KL), then the sum
    over sequences divided by ``num_sequences`` (default: this call's sequences with >= 1 response
    token). ``config`` defaults to ``GRPOConfig()`` (kl_beta 0.04: needs ``ref_logprobs``)."""
    config = GRPOConfig() if config is None else config
    pg, kl, mask, ratio, clipped, tis = _token_level(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, config, rollout_logprobs
    )
    lengths = mask.sum(dim=1).clamp(min=1).to(pg.dtype)
    pg_sum = (pg.sum(dim=1) / lengths).sum()
    kl_sum = None if kl is None else (kl.sum(dim=1) / lengths).sum()
    norm = _normalizer("num_sequences", num_sequences, mask.any(dim=1).sum().to(pg.dtype))
    diag = {**_ratio_diag(ratio, clipped, mask), **tis}
    return _finish(pg_sum, kl_sum, norm, config, diag, kl, mask)


def dr_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: DrGRPOConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_sequences: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr.GRPO: no length normalisation: sum of all token losses divided by the constant
    ``num_sequences * max_len`` (``config.max_len``, default this call's ``T``). Use it with
    ``group_advantages(..., normalize_std=False)``."""
    config = DrGRPOConfig() if config is None else config
    pg, kl, mask, ratio, clipped, tis = _token_level(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, config, rollout_logprobs
    )
    max_len = getattr(config, "max_len", None) or logprobs.shape[1]
    n_seq = _normalizer("num_sequences", num_sequences, mask.any(dim=1).sum().to(pg.dtype))
    norm = n_seq * float(max_len)
    diag = {**_ratio_diag(ratio, clipped, mask), **tis}
    return _finish(pg.sum(), None if kl is None else kl.sum(), norm, config, diag, kl, mask)


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: DAPOConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_tokens: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO: clip-higher surrogate, token-level mean over all response tokens of the batch:
    sum of token losses divided by ``num_tokens`` (default: this call's response tokens).
    Dynamic sampling (``nonconstant_group_mask``) and the overlong reward term
    (``overlong_penalty``) are applied by the caller before the advantages."""
    config = DAPOConfig() if config is None else config
    pg, kl, mask, ratio, clipped, tis = _token_level(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, config, rollout_logprobs
    )
    norm = _normalizer("num_tokens", num_tokens, mask.sum().to(pg.dtype))
    diag = {**_ratio_diag(ratio, clipped, mask), **tis}
    return _finish(pg.sum(), None if kl is None else kl.sum(), norm, config, diag, kl, mask)


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: GSPOConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_sequences: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: sequence-level, length-normalised ratio ``s_b = exp(mean_t (logp - old))`` over the
    response tokens, clipped to ``[1 - eps_low, 1 + eps_high]``, with a per-sequence advantage
    ``[B]``; loss ``sum_b -min(s_b A_b, clip(s_b) A_b) / num_sequences``. An optional KL term is
    the per-sequence token mean of the estimator, aggregated like the surrogate. Diagnostics
    (ratio, clip fraction) are over sequences."""
    config = GSPOConfig() if config is None else config
    mask, lp, log_ratio, adv, ref = _prepare(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        ref_logprobs,
        config,
        token_advantages_ok=False,
    )
    dtype = log_ratio.dtype
    lengths = mask.sum(dim=1).clamp(min=1).to(dtype)
    valid = mask.any(dim=1)
    seq_ratio = torch.exp(log_ratio.sum(dim=1) / lengths)
    pg, clipped = _clipped_surrogate(seq_ratio, adv, config.eps_low, config.eps_high)
    tis: dict[str, Tensor] = {}
    log_w = _tis_log_weights(old_logprobs, rollout_logprobs, mask, config)
    if log_w is not None:  # sequence level, length-normalised like GSPO's ratio
        w, tis = _tis_weights(log_w.sum(dim=1) / lengths, valid, config.tis_clip)
        pg = pg * w.to(pg.dtype)
    zero = torch.zeros((), dtype=dtype, device=pg.device)
    pg_sum = torch.where(valid, pg, zero).sum()
    kl = None
    kl_sum = None
    if ref is not None:
        kl = torch.where(mask, kl_estimate(lp, ref, config.kl_estimator), zero)
        kl_sum = (kl.sum(dim=1) / lengths).sum()
    norm = _normalizer("num_sequences", num_sequences, valid.sum().to(dtype))
    diag = {**_ratio_diag(seq_ratio, clipped & valid, valid), **tis}
    return _finish(pg_sum, kl_sum, norm, config, diag, kl, mask)
