"""Step placement and packing (data/batching.py), and algorithm.* validation, without Megatron."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_gvpo.data.batching import pack_sequences, plan_step
from megatron_gvpo.trainer.config import sections_from_dict, validate
from megatron_gvpo.trainer.objectives import algorithm_config


def _random_step(seed: int, num_groups: int = 9):
    rng = random.Random(seed)
    lengths, gids = [], []
    for g in range(num_groups):
        for _ in range(rng.choice([1, 2, 3, 4, 8])):
            lengths.append(rng.randint(3, 30))
            gids.append(1000 - 3 * g)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [lengths[i] for i in order], [gids[i] for i in order]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dp,budget,whole", [(1, 10_000, True), (2, 64, True), (4, 40, False)])
def test_plan_places_every_sample_once_within_budget(seed, dp, budget, whole):
    lengths, gids = _random_step(seed)
    plan = plan_step(lengths, gids, dp, budget, keep_groups_whole=whole)
    placed = [i for rank in plan.micro_batches for mb in rank for i in mb]
    assert sorted(placed) == list(range(len(lengths)))
    assert len(plan.micro_batches) == dp
    assert len({len(rank) for rank in plan.micro_batches}) == 1  # same count on every rank
    for rank in plan.micro_batches:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= min(budget, plan.seq_len)
    # A group never spans DP ranks.
    rank_of = {i: r for r, rank in enumerate(plan.micro_batches) for mb in rank for i in mb}
    for g in set(gids):
        assert len({rank_of[i] for i, x in enumerate(gids) if x == g}) == 1
    # groups_whole tells the truth.
    home = {}
    truth = True
    for r, rank in enumerate(plan.micro_batches):
        for m, mb in enumerate(rank):
            for i in mb:
                truth &= home.setdefault(gids[i], (r, m)) == (r, m)
    assert plan.groups_whole == truth
    if whole and budget >= 8 * 30:
        assert plan.groups_whole
    assert plan == plan_step(lengths, gids, dp, budget, keep_groups_whole=whole)


def test_plan_rejects_a_sample_over_the_budget():
    with pytest.raises(ValueError, match="trainer.max_tokens_per_microbatch=16"):
        plan_step([4, 20], [0, 0], 1, 16)


def test_pack_sequences_indexes_response_tokens():
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[11, 12], [13, 14, 15], []]
    packed = pack_sequences(prompts, responses, seq_len=16, pad_id=0)
    row = packed.tokens[0].tolist()
    assert row[:11] == [5, 6, 7, 11, 12, 8, 13, 14, 15, 9, 10] and row[11:] == [0] * 5
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]
    assert packed.cu_seqlens.tolist() == [0, 5, 9, 11, 16]
    assert packed.max_seqlen == 5
    for i, resp in enumerate(responses):
        idx = packed.response_index[i][packed.response_mask[i]]
        # logprob position t scores token t + 1
        assert [row[t + 1] for t in idx.tolist()] == resp
    with pytest.raises(ValueError, match="do not fit"):
        pack_sequences(prompts, responses, seq_len=8)



def _pack_reference(prompts, responses, seq_len, pad_id, loss_masks):
    """pack_sequences written out sample by sample."""
    tokens = [pad_id] * seq_len
    pos = [0] * seq_len
    max_resp = max([len(r) for r in responses] + [1])
    index = [[0] * max_resp for _ in prompts]
    mask = [[False] * max_resp for _ in prompts]
    cu, start = [0], 0
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[start : start + len(p) + len(r)] = p + r
        pos[start : start + len(p) + len(r)] = range(len(p) + len(r))
        for j in range(len(r)):
            index[i][j] = start + len(p) - 1 + j
            mask[i][j] = True if loss_masks is None else bool(loss_masks[i][j])
        start += len(p) + len(r)
        cu.append(start)
    if start < seq_len:
        pos[start:] = range(seq_len - start)
        cu.append(seq_len)
    return tokens, pos, cu, index, mask


@pytest.mark.parametrize("seed", range(40))
def test_pack_sequences_against_a_per_sample_reference(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 12)
    prompts = [[rng.randint(1, 99) for _ in range(rng.randint(1, 9))] for _ in range(k)]
    responses = [[rng.randint(1, 99) for _ in range(rng.randint(0, 11))] for _ in range(k)]
    masks = [[rng.randint(0, 1) for _ in r] for r in responses] if seed % 2 else None
    fill = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    seq_len = fill + rng.choice([0, 3, 17])
    packed = pack_sequences(prompts, responses, seq_len, pad_id=seed % 5, loss_masks=masks)
    tokens, pos, cu, index, mask = _pack_reference(prompts, responses, seq_len, seed % 5, masks)
    assert packed.tokens[0].tolist() == tokens and packed.position_ids[0].tolist() == pos
    assert packed.cu_seqlens.tolist() == cu and packed.cu_seqlens.dtype == torch.int32
    assert packed.response_index.tolist() == index and packed.response_mask.tolist() == mask
    assert packed.max_seqlen == max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(name="ppo"), "algorithm.name"),
        (dict(beta=0.0), "algorithm.beta"),
        (dict(beta=-1.0), "algorithm.beta"),
        (dict(name="gvpo", eps_low=0.2), "algorithm.eps_low"),
        (dict(name="dapo", eps_low=0.3, eps_high=0.2), "algorithm.eps_high"),
        (dict(name="grpo", eps_low=1.5, ref_model="r"), "algorithm.eps_low"),
        (dict(name="grpo"), "algorithm.kl_beta"),  # GRPO's KL (0.04) without a reference
        (dict(name="dapo", kl_beta=0.1), "algorithm.kl_beta"),
        (dict(kl_estimator="k9"), "algorithm.kl_estimator"),
        (dict(name="grpo", kl_estimator="k9", ref_model="r"), "algorithm.kl_estimator"),
        (dict(name="dapo", loss_agg_mode="token-sum"), "algorithm.loss_agg_mode"),
        (dict(name="gspo", ratio_level="sentence"), "algorithm.ratio_level"),
        (dict(temperature=0.0), "algorithm.temperature"),
    ],
)
def test_algorithm_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        algorithm_config(**kwargs)


def test_reference_model_only_when_a_kl_term_needs_it():
    assert not algorithm_config(name="gvpo").needs_reference
    assert not algorithm_config(name="dapo").needs_reference
    assert algorithm_config(name="grpo", ref_model="init").needs_reference
    assert not algorithm_config(name="grpo", kl_beta=0.0).needs_reference
    assert algorithm_config(name="dapo", eps_high=None).eps_high == 0.28


def _check_domains(name: str, domain_key):
    cfg = sections_from_dict({"algorithm": {"name": name}, "data": {"builtin": "toy_addition"}})
    cfg.data.domain_key = domain_key
    validate(cfg, world_size=1)


def test_group_robust_needs_domain_labels():
    with pytest.raises(ValueError, match="data.domain_key"):
        _check_domains("gr_gvpo", None)
    _check_domains("gr_gvpo", "domain")
    _check_domains("gvpo", None)


def test_gvpo_microbatch_losses_sum_to_the_whole_batch_loss():
    """Split by hand over 'micro-batches' with step-wide stats; compare with a float64 formula."""
    from megatron_gvpo.algorithms.gvpo import gvpo_group_stats, num_counted_groups
    from megatron_gvpo.models.forward import MicroBatch
    from megatron_gvpo.trainer.objectives.gvpo import GVPOMicroBatchLoss

    g = torch.Generator().manual_seed(0)
    gids = torch.tensor([3, 3, 3, 9, 9, 4, 7, 7, 7, 7])
    n, L = gids.numel(), 5
    lens = torch.randint(1, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lens[:, None]
    tok = torch.randn(n, L, generator=g, dtype=torch.float64).requires_grad_()
    old = torch.randn(n, L, generator=g, dtype=torch.float64) * mask
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    s = (tok * mask).sum(-1)
    beta = 0.3
    stats = gvpo_group_stats(s.detach(), old.sum(-1), rewards, gids, beta)
    loss_fn = GVPOMicroBatchLoss(beta, num_counted_groups(gids), stats)
    total = 0.0
    for ids in ([0, 5, 6], [1, 2, 3, 7], [4, 8, 9]):  # every group split somewhere
        idx = torch.tensor(ids)
        # A packed row holding exactly these samples' response tokens, back to back.
        row = torch.cat([tok[i, : lens[i]] for i in ids])[None]
        index = torch.zeros(len(ids), L, dtype=torch.long)
        start = 0
        for j, i in enumerate(ids):
            index[j, : lens[i]] = torch.arange(start, start + lens[i])
            start += int(lens[i])
        mb = MicroBatch(
            tokens=torch.zeros(1, 1, dtype=torch.long),
            extra=dict(
                sample_ids=idx,
                response_index=index,
                response_mask=mask[idx],
                group_ids=gids[idx],
                rewards=rewards[idx],
                old_logprobs=old[idx],
            ),
        )
        total = total + loss_fn(row, None, mb)[0]
    # float64 formula, groups of size >= 2 only (here: 3 of 4 groups).
    want = 0.0
    for gid in (3, 9, 7):
        sel = gids == gid
        d = beta * (s[sel] - old.sum(-1)[sel])
        c = (d - d.mean()) - (rewards[sel] - rewards[sel].mean())
        want = want + (c**2).sum() / (2 * (sel.sum() - 1))
    want = want / 3
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)
    (gt,) = torch.autograd.grad(total, tok, retain_graph=True)
    (gw,) = torch.autograd.grad(want, tok)
    torch.testing.assert_close(gt, gw, rtol=1e-10, atol=1e-12)


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal():
    """DAPO's filter on whole groups, after short and failed responses are gone: a group whose
    remaining rewards are equal gives no gradient and is dropped and counted."""
    from megatron_gvpo.trainer.groups import PromptGroup, filter_groups

    groups = [
        PromptGroup([1], [[2], [3], [4]], [1.0, 1.0, 1.0]),  # constant: dropped
        PromptGroup([1], [[2], [3], [4]], [1.0, 0.0, 1.0]),  # kept
        PromptGroup([1], [[2], [3, 4], [5]], [0.5, 0.5, 0.0], reward_failed=[False, False, True]),
        PromptGroup([1], [[2], [3]], [0.0, 1.0]),  # kept
    ]
    metrics: dict = {}
    kept = filter_groups(groups, 0, True, True, metrics)
    # the third group loses its failed response, then its rewards (0.5, 0.5) are constant
    assert [g.rewards for g in kept] == [[1.0, 0.0, 1.0], [0.0, 1.0]]
    assert metrics["filter/constant_reward_groups"] == 2
    assert metrics["filter/reward_failed"] == 1
    assert len(filter_groups(groups, 0, False, True, {})) == 4  # off: all groups stay
