"""Per-token estimators of KL(pi_theta || pi_ref) from samples y ~ pi_theta (Schulman's k1/k2/k3).

All take log-probabilities of the sampled tokens under the policy and under the reference, any
(equal) shape, and return a tensor of that shape. With ``d = ref_logprobs - logprobs``:

- ``k1 = -d = logp - ref``                 unbiased, high variance, can be negative;
- ``k2 = 0.5 * d**2``                      biased, low variance, >= 0;
- ``k3 = exp(d) - d - 1``                  unbiased, low variance, >= 0 (DeepSeekMath's GRPO term:
  pi_ref/pi - log(pi_ref/pi) - 1).

No clamping is applied: callers with badly mismatched policies should look at the values, not hide
them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _check(logprobs: Tensor, ref_logprobs: Tensor) -> None:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logp - ref."""
    _check(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref)^2."""
    _check(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1."""
    _check(logprobs, ref_logprobs)
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate with the named estimator (``"k1"``, ``"k2"`` or ``"k3"``)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}"
        ) from None
    return fn(logprobs, ref_logprobs)
