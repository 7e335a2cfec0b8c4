"""The GRPO family's one config: ``algorithm=grpo|dr_grpo|dapo|gspo`` composed by Hydra is the
``algorithms.grpo.PolicyLossConfig`` the loss receives, with each algorithm's published values,
and its knobs act whatever the algorithm's name. References: the published values written here,
and float64 loops of the formulas."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_gvpo.algorithms.grpo import (
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    PolicyLossConfig,
)

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    """The run's config as ``python -m megatron_gvpo.train *overrides`` builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_gvpo.trainer.config import register_configs, run_config_from_dict

    register_configs()
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return run_config_from_dict(OmegaConf.to_container(cfg, resolve=True))


# The values the configs produced before the family had one config (published defaults).
PUBLISHED = {
    "grpo": (GRPOConfig, dict(eps_low=0.2, eps_high=0.2, kl_beta=0.04, ref_model="actor_init",
                              loss_agg_mode="seq-mean-token-mean", ratio_level="token",
                              norm_adv_by_std=True)),
    "dr_grpo": (DrGRPOConfig, dict(eps_low=0.2, eps_high=0.2, kl_beta=0.0,
                                   loss_agg_mode="seq-mean-token-sum-norm", ratio_level="token",
                                   norm_adv_by_std=False)),
    "dapo": (DAPOConfig, dict(eps_low=0.2, eps_high=0.28, kl_beta=0.0, loss_agg_mode="token-mean",
                              ratio_level="token", norm_adv_by_std=True, overlong_buffer_len=0)),
    "gspo": (GSPOConfig, dict(eps_low=3e-4, eps_high=4e-4, kl_beta=0.0,
                              loss_agg_mode="seq-mean-token-mean", ratio_level="sequence",
                              norm_adv_by_std=True)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_composed_algorithm_is_the_loss_config_with_the_published_values(name):
    cfg = composed(f"algorithm={name}")
    cls, values = PUBLISHED[name]
    a = cfg.algorithm
    assert type(a) is cls and isinstance(a, PolicyLossConfig) and a.name == name
    assert {k: getattr(a, k) for k in values} == values
    assert (a.kl_estimator, a.use_tis, a.tis_clip) == ("k3", False, 2.0)
    assert a.temperature == cfg.rollout.temperature
    assert a.max_response_len == cfg.rollout.max_new_tokens  # Dr.GRPO's constant normaliser
    assert a.needs_reference == (name == "grpo")
    assert a.reference_path == ("actor_init" if name == "grpo" else None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.eps_low = 0.1  # type: ignore[misc]
    # Python callers get the same published values.
    bare = cls()
    assert {k: getattr(bare, k) for k in values if k != "ref_model"} == {
        k: v for k, v in values.items() if k != "ref_model"
    }


def test_overrides_compose_onto_the_frozen_schema():
    a = composed("algorithm=dapo", "algorithm.eps_high=0.3", "algorithm.use_tis=true").algorithm
    assert (a.eps_low, a.eps_high, a.use_tis, a.loss_agg_mode) == (0.2, 0.3, True, "token-mean")
    a = composed("algorithm=grpo", "algorithm.loss_agg_mode=token-mean").algorithm
    assert type(a) is GRPOConfig and a.loss_agg_mode == "token-mean" and a.kl_beta == 0.04


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(loss_agg_mode="seq-sum"), "algorithm.loss_agg_mode"),
        (dict(ratio_level="seq"), "algorithm.ratio_level"),
        (dict(norm_adv_by_std="no"), "algorithm.norm_adv_by_std"),
        (dict(max_response_len=0), "algorithm.max_response_len"),
        (dict(overlong_buffer_len=4), "algorithm.overlong_buffer_len"),  # no max_response_len
        (dict(max_response_len=8, overlong_buffer_len=9), "algorithm.overlong_buffer_len"),
        (dict(tis_clip=-1.0), "algorithm.tis_clip"),
    ],
)
def test_bad_knob_is_one_line_naming_the_key(kwargs, key):
    from megatron_gvpo.trainer.objectives import algorithm_config

    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        algorithm_config(name="grpo", ref_model="init", **kwargs)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------- the objective, end to end


def _batch_and_micro_batch(seed: int = 0):
    """Two groups of three samples of unequal lengths, one packed micro-batch holding them all,
    theta' near theta (some ratios clip) and a row of current logprobs."""
    from megatron_gvpo.models.forward import MicroBatch
    from megatron_gvpo.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    lengths = [2, 7, 4, 5, 1, 9]
    width = max(lengths)
    batch = RolloutBatch(
        prompt_ids=[[1, 2]] * 6,
        response_ids=[[3] * n for n in lengths],
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0]),
    )
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    index = torch.zeros(6, width, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        index[i, :n] = torch.arange(start, start + n)
        start += n
    row = (-torch.rand(1, start, generator=g, dtype=torch.float64) - 0.2).requires_grad_(True)
    new = row.detach()[0][index] * mask
    old = torch.where(mask, new + 0.25 * torch.randn(6, width, generator=g, dtype=torch.float64), 0)

    def micro_batch() -> MicroBatch:
        return MicroBatch(
            tokens=torch.zeros(1, 1, dtype=torch.long),
            extra=dict(
                sample_ids=torch.arange(6),
                response_index=index,
                response_mask=mask,
                old_logprobs=old,
                advantages=batch.advantages,
            ),
        )

    return batch, micro_batch, row, old, mask


def _objective_loss(algorithm, batch, micro_batch, row):
    from megatron_gvpo.trainer.objectives import StepInputs, build_objective

    objective = build_objective(algorithm)
    objective.prepare_round(batch)
    mb = micro_batch()
    loss_fn = objective.step_loss(StepInputs(batch, None, [mb], lambda: None))
    return loss_fn(row, None, mb)


def test_the_loss_receives_the_composed_config_itself(monkeypatch):
    import megatron_gvpo.trainer.objectives.grpo as objectives_grpo

    algorithm = composed("algorithm=dapo", "algorithm.eps_high=0.3").algorithm
    seen = []
    real = objectives_grpo.policy_loss

    def recording(*args, **kwargs):
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives_grpo, "policy_loss", recording)
    batch, micro_batch, row, _, _ = _batch_and_micro_batch()
    _objective_loss(algorithm, batch, micro_batch, row)
    assert len(seen) == 1 and seen[0] is algorithm  # no translation on the way


def _ref_surrogate(lp, old, a, lo, hi):
    """-min(r A, clip(r) A) for 0-dim tensors; the clipped branch is a constant."""
    r = torch.exp(lp - old)
    rc = min(max(float(r.detach()), 1 - lo), 1 + hi)
    return -(r * a) if float(r.detach()) * a <= rc * a else -(r * 0 + rc * a)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_agg_mode_on_grpo_aggregates_as_the_formula(mode):
    """``algorithm=grpo algorithm.loss_agg_mode=token-mean`` is DAPO's aggregation (token sum
    over the step's response tokens), the default GRPO's per-sequence token mean."""
    algorithm = composed(
        "algorithm=grpo", f"algorithm.loss_agg_mode={mode}", "algorithm.kl_beta=0"
    ).algorithm
    batch, micro_batch, row, old, mask = _batch_and_micro_batch(seed=1)
    loss, metrics = _objective_loss(algorithm, batch, micro_batch, row)
    (grad,) = torch.autograd.grad(loss, row)

    ref_row = row.detach().clone().requires_grad_(True)
    index = micro_batch().extra["response_index"]
    per_seq, tokens = [], 0
    for b in range(6):
        adv = float(batch.advantages[b])
        terms = [
            _ref_surrogate(ref_row[0, index[b, t]], old[b, t], adv, 0.2, 0.2)
            for t in range(mask.shape[1])
            if mask[b, t]
        ]
        per_seq.append(terms)
        tokens += len(terms)
    if mode == "token-mean":
        want = sum(sum(t) for t in per_seq) / tokens
    else:
        want = sum(sum(t) / len(t) for t in per_seq) / len(per_seq)
    (want_grad,) = torch.autograd.grad(want, ref_row)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert 0 < float(metrics["clip_fraction"].value) < 1  # both branches taken


def test_advantage_and_overlong_knobs_act_on_any_name():
    """``norm_adv_by_std=false`` and the overlong punishment on ``algorithm=grpo``: advantages
    are the centred rewards after the penalty, as written out here."""
    algorithm = composed(
        "algorithm=grpo",
        "algorithm.norm_adv_by_std=false",
        "algorithm.max_response_len=8",
        "algorithm.overlong_buffer_len=4",
        "algorithm.kl_beta=0",
    ).algorithm
    batch, micro_batch, row, _, _ = _batch_and_micro_batch()
    lengths = [len(r) for r in batch.response_ids]
    rewards = batch.rewards.tolist()
    _objective_loss(algorithm, batch, micro_batch, row)
    penalised = [
        r + (0.0 if n <= 4 else -1.0 if n > 8 else (4 - n) / 4)
        for r, n in zip(rewards, lengths, strict=True)
    ]
    want = []
    for i in range(6):
        group = [penalised[j] for j in range(6) if j // 3 == i // 3]
        want.append(penalised[i] - sum(group) / 3)
    assert batch.advantages.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
