"""The GRPO family as pure tensor losses: GRPO, Dr.GRPO, DAPO, GSPO, and their one config.

(One module for the four: they share the clipped surrogate, the KL term and the normalisers below,
and differ only in three knobs of :class:`PolicyLossConfig`, so the table below is their whole
specification.)

Token-level inputs are ``[B, T]`` tensors aligned on response tokens: ``logprobs`` (theta, with
grad), ``old_logprobs`` (the sampling policy), optional ``ref_logprobs`` (frozen reference) and a
``response_mask`` (bool or 0/1) that is true on response tokens. Values at masked-out positions are
ignored (they may be anything finite or not). ``advantages`` are per sequence ``[B]`` (broadcast
over tokens) or per token ``[B, T]``; ``group_advantages`` builds them from rewards (divided by the
group's std when ``norm_adv_by_std``).

With ``r_t = exp(logp_t - old_t)`` and advantage ``A``, the clipped per-token surrogate loss is
``l_bt = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)``, plus ``kl_beta * k(logp_t, ref_t)``
when ``kl_beta > 0`` (``k`` from ``kl.py``, k3 by default). ``ratio_level="sequence"`` (GSPO) uses
instead one length-normalised ratio per sequence, ``s_b = exp(mean_t (logp - old))``, and one
surrogate ``l_b = -min(s_b A_b, clip(s_b) A_b)`` (``[B]`` advantages), which stands for each of the
sequence's tokens. ``loss_agg_mode`` (verl's names) aggregates (m = mask, S sequences):

===========================  ================================================  ===================
``loss_agg_mode``            aggregation of the per-token loss ``l_bt``        normaliser argument
===========================  ================================================  ===================
``seq-mean-token-mean``      ``(1/S) sum_b (sum_t m l_bt) / (sum_t m_bt)``     ``num_sequences``
``seq-mean-token-sum-norm``  ``sum_{b,t} m l_bt / (S * max_response_len)``     ``num_sequences``
``token-mean``               ``sum_{b,t} m l_bt / N_tok``                      ``num_tokens``
===========================  ================================================  ===================

The published algorithms are settings of these knobs (their configs below change only defaults):

========  =======================  ===========  ===================  ==================
loss      ``loss_agg_mode``        ratio level  ``norm_adv_by_std``  clip (low / high)
========  =======================  ===========  ===================  ==================
GRPO      seq-mean-token-mean      token        true                 0.2 / 0.2, KL 0.04
Dr.GRPO   seq-mean-token-sum-norm  token        false                0.2 / 0.2
DAPO      token-mean               token        true                 0.2 / 0.28
GSPO      seq-mean-token-mean      sequence     true                 3e-4 / 4e-4
========  =======================  ===========  ===================  ==================

Split / distributed use: every loss is a plain sum over sequences or tokens divided by a
normaliser. Pass the normaliser of the *whole step batch* (global number of sequences with at
least one response token, or global number of response tokens, over all micro-batches and DP
ranks); then the sum of the per-micro-batch losses over micro-batches and ranks equals the loss of
the full batch, value and gradient. Left as ``None`` the normaliser is the local one (sequences
with at least one response token, or response tokens, of this call), which is the full-batch loss
when the call sees the whole batch. With ``seq-mean-token-sum-norm`` set ``max_response_len`` (the
generation length limit) in split use: left as ``None`` it is this call's ``T``, which may differ
between micro-batches.

Truncated importance sampling (TIS, off by default): with ``use_tis`` and the sampling engine's
own logprobs ``rollout_logprobs``, each token's surrogate loss is multiplied by the detached
weight ``w_t = min(exp(old_t - rollout_t), tis_clip)``: the ratio of theta' (the actor's
recomputed logprob of the sampled token) to the engine's, truncated above, as slime's
``--use-tis``/``--tis-clip`` and verl's token-level rollout IS do. A sequence-level ratio uses the
sequence-level weight ``min(exp(mean_t (old - rollout)), tis_clip)``, matching it. The KL term is
not weighted. Diagnostics ``tis_mean``, ``tis_max`` and ``tis_clip_fraction`` (share of weights
cut at ``tis_clip``) are added.

Diagnostics (detached 0-dim tensors, over this call's response tokens, or sequences for a
sequence-level ratio): ``pg_loss`` and ``kl_loss`` (the two parts of ``loss``), ``clip_fraction``
(share of tokens whose surrogate takes the clipped branch, i.e. whose gradient is cut: ``A > 0,
r > 1 + eps_high`` or ``A < 0, r < 1 - eps_low``), ``ratio_mean``, ``ratio_min``, ``ratio_max``,
``kl_mean`` (mean per-token KL estimate, when ``ref_logprobs`` is given), ``num_tokens``,
``num_sequences``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_gvpo.algorithms._groups import check_group_ids, group_index, group_sum
from megatron_gvpo.algorithms.config import AlgorithmConfig, finite_number, one_of
from megatron_gvpo.algorithms.kl import KL_ESTIMATORS, kl_estimate

__all__ = [
    "LOSS_AGG_MODES",
    "RATIO_LEVELS",
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
    "overlong_penalty",
    "policy_loss",
]

LOSS_AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean")
RATIO_LEVELS = ("token", "sequence")


# --------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PolicyLossConfig(AlgorithmConfig):
    """``algorithm.*`` of the clipped-ratio family: what :func:`policy_loss` computes, and the
    Hydra schema of ``algorithm=grpo|dr_grpo|dapo|gspo`` (their configs below set defaults)."""

    eps_low: float = 0.2
    """Lower clip range: ratio >= 1 - eps_low; in [0, 1)."""
    eps_high: float | None = None
    """Upper clip range: ratio <= 1 + eps_high (DAPO's clip-higher: 0.28); >= eps_low. None: the
    algorithm's published value (GRPO, Dr.GRPO: equal to eps_low)."""
    kl_beta: float = 0.0
    """Weight of the KL term to the frozen reference (GRPO: 0.04; 0 builds no reference; > 0 needs
    ``ref_logprobs`` in the loss)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (Schulman's estimators, ``kl.py``; k3 as in DeepSeekMath)."""
    ref_model: str | None = None
    """The reference the trainer builds: ``actor_init`` (the actor's starting weights), an HF
    folder or a converted checkpoint. Needed in a run when kl_beta > 0."""
    loss_agg_mode: str = "seq-mean-token-mean"
    """seq-mean-token-mean (GRPO: per-sequence token mean, then the mean over sequences),
    seq-mean-token-sum-norm (Dr.GRPO: token sum over S * max_response_len) or token-mean (DAPO:
    mean over the step's response tokens)."""
    ratio_level: str = "token"
    """token: one importance ratio per token; sequence (GSPO): one length-normalised ratio per
    sequence, exp(mean_t (logp - old)), clipped as a whole."""
    norm_adv_by_std: bool = True
    """Advantages (R - mean) / std of the group; false (Dr.GRPO): R - mean."""
    max_response_len: int | None = None
    """The generation limit (``rollout.max_new_tokens``): the constant normaliser of
    seq-mean-token-sum-norm (None: each call's T) and the overlong limit."""
    overlong_buffer_len: int = 0
    """DAPO's soft overlong punishment: responses longer than max_response_len - this lose up to
    1 reward, linearly (0: off)."""
    use_tis: bool = False
    """Truncated importance sampling against the engine's logprobs (slime's ``--use-tis``): each
    token's policy-gradient term is weighted by min(pi_theta'(y) / pi_engine(y), tis_clip),
    detached. Corrects engine/trainer mismatch and stale (async) samples; GVPO needs none."""
    tis_clip: float = 2.0
    """The truncation C of the TIS weight (slime's ``--tis-clip``, verl's rollout_is_threshold)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        eps_low = finite_number("algorithm.eps_low", self.eps_low)
        if eps_low < 0 or eps_low >= 1:
            raise ValueError(f"algorithm.eps_low must be in [0, 1), got {self.eps_low!r}")
        if self.eps_high is None:
            published = self.__dataclass_fields__["eps_high"].default  # this algorithm's
            object.__setattr__(self, "eps_high", eps_low if published is None else published)
        eps_high = finite_number("algorithm.eps_high", self.eps_high)
        if eps_high < 0:
            raise ValueError(f"algorithm.eps_high must be >= 0, got {self.eps_high!r}")
        if eps_high < eps_low:
            raise ValueError(
                f"algorithm.eps_high ({eps_high}) must be >= algorithm.eps_low ({eps_low})"
            )
        kl_beta = finite_number("algorithm.kl_beta", self.kl_beta)
        if kl_beta < 0:
            raise ValueError(f"algorithm.kl_beta must be >= 0, got {self.kl_beta!r}")
        one_of("algorithm.kl_estimator", self.kl_estimator, tuple(sorted(KL_ESTIMATORS)))
        one_of("algorithm.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        one_of("algorithm.ratio_level", self.ratio_level, RATIO_LEVELS)
        for key in ("norm_adv_by_std", "use_tis"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"algorithm.{key} must be true or false, got {getattr(self, key)!r}")
        n = self.max_response_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"algorithm.max_response_len must be a positive int or null, got {n!r}")
        buf = self.overlong_buffer_len
        if isinstance(buf, bool) or not isinstance(buf, int) or buf < 0:
            raise ValueError(f"algorithm.overlong_buffer_len must be an int >= 0, got {buf!r}")
        if buf and (n is None or buf > n):
            raise ValueError(
                f"algorithm.overlong_buffer_len={buf} must lie in "
                f"(0, algorithm.max_response_len={n}]"
            )
        tis_clip = finite_number("algorithm.tis_clip", self.tis_clip)
        if tis_clip <= 0:
            raise ValueError(f"algorithm.tis_clip must be > 0, got {self.tis_clip!r}")
        for key, value in (("eps_low", eps_low), ("eps_high", eps_high), ("kl_beta", kl_beta),
                           ("tis_clip", tis_clip)):
            object.__setattr__(self, key, value)

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0

    @property
    def reference_path(self) -> str | None:
        return self.ref_model if self.needs_reference else None

    def check_run(self) -> None:
        if self.needs_reference and not self.ref_model:
            raise ValueError(
                f"algorithm.kl_beta={self.kl_beta} needs a reference model: set "
                "algorithm.ref_model (for example to the initial policy) or algorithm.kl_beta=0"
            )


@dataclass(frozen=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO (DeepSeekMath): symmetric clip 0.2, (R - mean) / std advantages, per-sequence token
    mean, k3 KL to the reference with beta 0.04.

    Against TRL's ``GRPOTrainer`` (1.16) with ``loss_type="grpo"``: the same update (sample std
    with Bessel's correction, clip, aggregation, Adam, gradient-norm clipping), except that TRL
    divides by ``std + 1e-4`` where we (and verl) use ``std + 1e-6``, and TRL's defaults differ:
    no KL (``beta=0``), ``loss_type="dapo"``, and a linear decay of the learning rate to 0
    (transformers' ``lr_scheduler_type``; ours is constant). See docs/benchmarks.md."""

    name: str = "grpo"
    kl_beta: float = 0.04


@dataclass(frozen=True)
class DrGRPOConfig(PolicyLossConfig):
    """Dr.GRPO: no std division, the constant length normaliser ``max_response_len`` (the
    generation limit; None: the ``T`` of the tensors given to each call), no KL."""

    name: str = "dr_grpo"
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    norm_adv_by_std: bool = False


@dataclass(frozen=True)
class DAPOConfig(PolicyLossConfig):
    """DAPO: clip-higher (0.2 / 0.28), token-level mean, no KL; with the trainer, dynamic
    sampling (``trainer.dynamic_sampling=true``) and the soft overlong punishment
    (``overlong_buffer_len``)."""

    name: str = "dapo"
    eps_high: float | None = 0.28
    loss_agg_mode: str = "token-mean"


@dataclass(frozen=True)
class GSPOConfig(PolicyLossConfig):
    """GSPO: sequence-level, length-normalised ratio; the paper's clip ranges 3e-4 / 4e-4; no
    KL."""

    name: str = "gspo"
    eps_low: float = 3e-4
    eps_high: float | None = 4e-4
    ratio_level: str = "sequence"


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
    eps = finite_number("eps", eps)
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
    if not config.use_tis:
        return None
    if rollout_logprobs is None:
        raise ValueError("use_tis needs rollout_logprobs (the engine's logprobs); got None")
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
    where masked; pg carries the TIS weight when ``config.use_tis``."""
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


def _sequence_level(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None,
    config: PolicyLossConfig,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """GSPO's ``(pg [B], kl [B, T] or None, mask, ratio [B], clipped [B], tis diagnostics)``:
    one clipped surrogate per sequence (0 for sequences without response tokens), on the ratio
    ``exp(mean_t (logp - old))``; pg carries the sequence-level TIS weight when ``use_tis``."""
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
    if log_w is not None:  # sequence level, length-normalised like the ratio
        w, tis = _tis_weights(log_w.sum(dim=1) / lengths, valid, config.tis_clip)
        pg = pg * w.to(pg.dtype)
    zero = torch.zeros((), dtype=dtype, device=pg.device)
    pg = torch.where(valid, pg, zero)
    kl = None
    if ref is not None:
        kl = torch.where(mask, kl_estimate(lp, ref, config.kl_estimator), zero)
    return pg, kl, mask, seq_ratio, clipped & valid, tis


def _aggregate(
    pg: Tensor,
    kl: Tensor | None,
    mask: Tensor,
    config: PolicyLossConfig,
    num_sequences: float | int | None,
    num_tokens: float | int | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(pg_sum, kl_sum, norm)`` of ``config.loss_agg_mode`` (the table above). ``pg`` is
    per token ``[B, T]``, or per sequence ``[B]`` (a sequence-level ratio: the value of each of
    the sequence's tokens); ``kl`` is per token."""
    mode = config.loss_agg_mode
    dtype = pg.dtype
    lengths = mask.sum(dim=1).clamp(min=1).to(dtype)
    if mode == "token-mean":
        norm = _normalizer("num_tokens", num_tokens, mask.sum().to(dtype))
    else:
        norm = _normalizer("num_sequences", num_sequences, mask.any(dim=1).sum().to(dtype))
        if mode == "seq-mean-token-sum-norm":
            norm = norm * float(config.max_response_len or mask.shape[1])

    def total(x: Tensor) -> Tensor:
        if mode == "seq-mean-token-mean":
            return x.sum() if x.dim() == 1 else (x.sum(dim=1) / lengths).sum()
        return (x * lengths).sum() if x.dim() == 1 else x.sum()

    return total(pg), None if kl is None else total(kl), norm


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


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    num_sequences: float | int | None = None,
    num_tokens: float | int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The family's loss and diagnostics, as ``config``'s knobs say: the ratio level
    (``ratio_level``), the aggregation (``loss_agg_mode``), clip, KL and TIS. Of the two
    normalisers, the one the aggregation uses is read (``num_tokens`` for token-mean,
    ``num_sequences`` otherwise; None: this call's)."""
    level = _sequence_level if config.ratio_level == "sequence" else _token_level
    pg, kl, mask, ratio, clipped, tis = level(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, config, rollout_logprobs
    )
    pg_sum, kl_sum, norm = _aggregate(pg, kl, mask, config, num_sequences, num_tokens)
    valid = mask if ratio.dim() == 2 else mask.any(dim=1)
    diag = {**_ratio_diag(ratio, clipped, valid), **tis}
    return _finish(pg_sum, kl_sum, norm, config, diag, kl, mask)


def _published(
    config: PolicyLossConfig | None, default: type[PolicyLossConfig], loss: str
) -> PolicyLossConfig:
    """``config`` (default: ``default()``), refused when its aggregation or ratio level is not
    the published loss's: :func:`policy_loss` computes any other combination."""
    if config is None:
        return default()
    want = default()
    for key in ("loss_agg_mode", "ratio_level"):
        if getattr(config, key) != getattr(want, key):
            raise ValueError(
                f"{loss} has {key}={getattr(want, key)!r}, the config {getattr(config, key)!r}; "
                "use policy_loss for other combinations"
            )
    return config


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_sequences: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (DeepSeekMath): per-sequence token mean of the clipped surrogate (+ KL), then the sum
    over sequences divided by ``num_sequences`` (default: this call's sequences with >= 1 response
    token). ``config`` defaults to ``GRPOConfig()`` (kl_beta 0.04: needs ``ref_logprobs``)."""
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        _published(config, GRPOConfig, "grpo_loss"),
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
        num_sequences=num_sequences,
    )


def dr_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_sequences: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr.GRPO: no length normalisation: sum of all token losses divided by the constant
    ``num_sequences * max_response_len`` (default this call's ``T``). Use it with
    ``group_advantages(..., normalize_std=False)``."""
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        _published(config, DrGRPOConfig, "dr_grpo_loss"),
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
        num_sequences=num_sequences,
    )


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    num_tokens: float | int | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO: clip-higher surrogate, token-level mean over all response tokens of the batch:
    sum of token losses divided by ``num_tokens`` (default: this call's response tokens).
    Dynamic sampling (groups whose rewards are all equal dropped, ``trainer.dynamic_sampling``)
    and the overlong reward term (``overlong_penalty``) are applied by the caller before the
    advantages."""
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        _published(config, DAPOConfig, "dapo_loss"),
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
        num_tokens=num_tokens,
    )


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig | None = None,
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
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        _published(config, GSPOConfig, "gspo_loss"),
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs,
        num_sequences=num_sequences,
    )
