"""Preference training: pair loading, the DPO/IPO/GR-* objectives against float64 formulas written
from the papers, and the driver run as users run it (metrics, restart, bad rows).

Gradients through the real Megatron model at TP2/PP2/DP2 are in ``test_loss_layout.py``; here the
objectives' micro-batch losses run on packed micro-batches built by ``data.batching`` with a
leaf tensor standing in for the model's logprobs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from megatron_gvpo.data.batching import StepPlan, pack_sequences
from megatron_gvpo.data.preference import PreferenceDataConfig, load_pairs, read_pair_rows
from megatron_gvpo.data.prompts import DataError
from megatron_gvpo.data.sampler import DomainBalancedSampler, DomainProportionSampler
from megatron_gvpo.demo.task import build_char_tokenizer
from megatron_gvpo.models.forward import MicroBatch
from megatron_gvpo.trainer.batch import RolloutBatch
from megatron_gvpo.trainer.data import PreferenceDataSection
from megatron_gvpo.trainer.objectives import StepInputs, algorithm_config, build_objective

# ------------------------------------------------------------------------------------ loading


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3", "domain": "a"}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"prompt": "1+1=", "rejected": "3", "domain": "a"}, "'chosen'"),
        ({**GOOD, "rejected": 7}, "'rejected' must be a string or a list of chat turns"),
        ({**GOOD, "chosen": ""}, "'chosen' is empty"),
        ({**GOOD, "chosen": [{"role": "assistant"}]}, "'chosen'[0].content"),
        ({"chosen": "2", "rejected": "3", "domain": "a"}, "neither 'prompt' nor 'messages'"),
        ({**GOOD, "domain": ["x"]}, "'domain' must be a string or a number"),
        ('{"prompt": "1+1=", "chosen"', "invalid JSON"),
    ],
)
def test_bad_rows_are_named_by_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        read_pair_rows(PreferenceDataConfig(path=path), path)  # no tokenizer, no model
    assert f"{path}:3" in str(e.value) and field in str(e.value)


def test_a_missing_domain_label_among_labelled_rows_is_named(tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD, {k: v for k, v in GOOD.items() if k != "domain"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: has no 'domain'"):
        read_pair_rows(PreferenceDataConfig(path=path), path)


def test_pairs_tokenised_and_domains_counted(tmp_path):
    rows = [GOOD, {**GOOD, "domain": "b"}, {**GOOD, "chosen": "22"}, {**GOOD, "prompt": "x" * 50}]
    path = _write(tmp_path / "p.jsonl", rows)
    tok = build_char_tokenizer()
    data = load_pairs(PreferenceDataConfig(path=path, max_prompt_length=20), tok)
    assert data.domains == ["a", "b"] and data.domain_counts == [2, 1]  # N_d; the long one dropped
    assert data.stats.too_long == 1
    p = data[2]
    assert p.prompt_ids == tok("1+1=")["input_ids"]  # BOS + characters
    assert p.chosen_ids == tok("22", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p.rejected_ids[-1] == tok.eos_token_id


def test_chat_pairs_take_the_template_suffix_as_response(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yo"}],
        "rejected": "no",  # text beside chat turns: an assistant turn
    }
    data = load_pairs(PreferenceDataConfig(path=_write(tmp_path / "c.jsonl", [row])), tok)
    p = data[0]
    assert tok.decode(p.prompt_ids) == "<user>hi</s><assistant>"
    assert tok.decode(p.chosen_ids) == "yo</s>" and tok.decode(p.rejected_ids) == "no</s>"
    assert data.domains == ["default"]


def test_old_domain_key_and_sampling_names_are_refused_naming_the_new_ones():
    with pytest.raises(ValueError, match="data.group_key='grp' was renamed data.domain_key"):
        PreferenceDataSection(path="x", group_key="grp")
    with pytest.raises(ValueError, match="data.sampling=proportional"):
        PreferenceDataSection(path="x", sampling="group")


def test_balanced_sampler_gives_each_domain_its_share_of_every_batch_and_resumes():
    domains = [1] * 45 + [0] * 5 + [2] * 50  # the minority's rows are cycled through in epochs
    s = DomainBalancedSampler(domains, batch_size=7, seed=4)
    seen = {0: [], 1: [], 2: []}
    for b in range(30):
        batch = s.next_batch()
        per = [sum(domains[i] == d for i in batch) for d in range(3)]
        assert sorted(per) == [2, 2, 3] and per[b % 3] == 3  # the extra row rotates
        for i in batch:
            seen[domains[i]].append(i)
    minority = seen[0]  # 70 draws of 5 rows: each row 14 times, every 5 draws a full epoch
    for e in range(len(minority) // 5):
        assert sorted(minority[5 * e : 5 * e + 5]) == list(range(45, 50))
    state = s.state_dict()
    want = [s.next_batch() for _ in range(3)]
    t = DomainBalancedSampler(domains, batch_size=7, seed=4)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(3)] == want
    with pytest.raises(ValueError, match="seed"):
        DomainBalancedSampler(domains, batch_size=7, seed=5).load_state_dict(state)


def test_alpha_allocation_of_a_step_and_the_sampler_following_it():
    """Units per domain in proportion to alpha by largest remainders, at least one each; the
    stratified sampler draws what the allocation says at draw time."""
    from megatron_gvpo.trainer.objectives.robust import DomainRobust

    robust = DomainRobust(["a", "b", "c"], 0.1, "stratified", "alpha")
    robust.weights.alpha = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    # B = 10: one each, then 7 by alpha: 4.9, 1.4, 0.7 -> 4, 1, 0 and the 2 left to the largest
    # remainders (0.9, 0.7): 1 + (5, 1, 1) = (6, 2, 2)
    assert robust.rows_per_domain(10) == [6, 2, 2]
    assert robust.rows_per_domain(2) == [1, 1, 0]  # fewer rows than domains: by alpha alone
    assert robust.allocation()(16) == robust.rows_per_domain(16)
    assert DomainRobust(["a", "b"], 0.1, "stratified", "equal").allocation()(5) == [3, 2]
    assert DomainRobust(["a", "b"], 0.1, "importance", "alpha").allocation() is None
    domains = [0] * 30 + [1] * 5 + [2] * 15
    s = DomainBalancedSampler(domains, batch_size=10, seed=0, allocation=robust.allocation())
    for _ in range(4):
        batch = s.next_batch()
        assert [sum(domains[i] == d for i in batch) for d in range(3)] == [6, 2, 2]
        # interleaved: each half of the step holds half of each domain's rows
        assert [sum(domains[i] == d for i in batch[:5]) for d in range(3)] == [3, 1, 1]
    robust.weights.alpha = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)
    batch = s.next_batch()
    assert [sum(domains[i] == d for i in batch) for d in range(3)] == robust.rows_per_domain(10)


def test_proportional_sampler_draws_by_domain_share_and_resumes():
    groups = [0] * 90 + [1] * 10
    s = DomainProportionSampler(groups, batch_size=500, seed=3)
    first = s.next_batch()
    share = sum(groups[i] for i in first) / len(first)
    assert 0.05 < share < 0.15
    state = s.state_dict()
    want = s.next_batch()
    t = DomainProportionSampler(groups, batch_size=500, seed=3)
    t.load_state_dict(state)
    assert t.next_batch() == want


# --------------------------------------------------------------------------------- objectives

SIZES = (30, 5, 15)  # N_d of the dataset (not the step's proportions)
# The pairs' domains in three consecutive steps: imbalanced, domain 1 ("b") absent from the second.
STEP_DOMAINS = ([0, 1, 0, 2, 0, 2], [0, 0, 2, 0, 2, 0], [2, 0, 0, 0, 0, 1])


def _pairs_batch(n_pairs: int, seed: int, domains=STEP_DOMAINS[0]) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(n_pairs):
        p = torch.randint(5, 50, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        for _ in range(2):
            n = int(torch.randint(1, 6, (1,), generator=g))
            prompts.append(p.tolist())
            responses.append(torch.randint(5, 50, (n,), generator=g).tolist())
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=torch.arange(n_pairs).repeat_interleave(2),
        rewards=torch.tensor([1.0, -1.0]).repeat(n_pairs),
        domains=torch.tensor(domains[:n_pairs]).repeat_interleave(2),
    )


def _micro_batch(batch: RolloutBatch, ids: list[int], seq_len: int, ref: list[torch.Tensor]):
    packed = pack_sequences(
        [batch.prompt_ids[i] for i in ids], [batch.response_ids[i] for i in ids], seq_len, 0
    )
    width = packed.response_index.shape[1]
    refs = torch.zeros(len(ids), width)
    for row, i in enumerate(ids):
        refs[row, : len(ref[i])] = ref[i]
    idx = torch.tensor(ids)
    extra = {
        "sample_ids": idx,
        "response_index": packed.response_index,
        "response_mask": packed.response_mask,
        "group_ids": batch.group_ids[idx],
        "rewards": batch.rewards[idx],
        "domains": batch.domains[idx],
        "ref_logprobs": refs,
    }
    return MicroBatch(packed.tokens, packed.position_ids, None, extra)


def _objective(name: str, estimator: str = "stratified"):
    kw = {"beta": 0.7}
    if name.startswith("gr_"):
        kw |= {"robust_eta": 0.3, "robust_estimator": estimator}
    obj = build_objective(algorithm_config(name=name, **kw), ["a", "b", "c"])
    obj.set_domain_sizes(SIZES)
    return obj


def _run(obj, batch, placement: list[list[int]], seed: int = 0):
    """The objective's loss on micro-batches ``placement``, with each sample's response-token
    logprobs a leaf tensor written into the packed row at its positions: (sum of the
    micro-batch losses, s, reference logprobs, d loss / d token logprobs per sample, metrics)."""
    g = torch.Generator().manual_seed(seed)
    ref = [-2.0 * torch.rand(len(r), generator=g) for r in batch.response_ids]
    leaves = [
        (-3.0 * torch.rand(len(r), generator=g)).requires_grad_(True) for r in batch.response_ids
    ]
    seq_len = 64
    mbs = [_micro_batch(batch, ids, seq_len, ref) for ids in placement]

    def row(mb):
        out = torch.zeros(1, seq_len - 1)
        for r, i in enumerate(mb.extra["sample_ids"].tolist()):
            pos = mb.extra["response_index"][r][mb.extra["response_mask"][r]]
            out = out.index_put((torch.zeros_like(pos), pos), leaves[i])
        return out

    def step_log_ratio():
        s = torch.stack([x.detach().double().sum() for x in leaves])
        return s - torch.stack([r.double().sum() for r in ref])

    whole = all(len({batch.group_ids[i].item() for i in ids}) * 2 == len(ids) for ids in placement)
    plan = StepPlan([placement], seq_len, whole)
    loss_fn = obj.step_loss(StepInputs(batch, plan, mbs, step_log_ratio))
    total, metrics = 0.0, []
    for mb in mbs:
        loss, m = loss_fn(row(mb), None, mb)
        total = total + loss
        metrics.append(m)
    total.backward()
    s = [x.detach().double().sum() for x in leaves]
    return total.detach(), s, ref, [x.grad.clone() for x in leaves], metrics


def _pair_losses(name, s, ref, batch, beta=0.7):
    """float64, from the papers: h = (s_c - r_c) - (s_r - r_r); DPO -log sigmoid(beta h)
    (Rafailov et al.), IPO (h - 1/(2 beta))^2 (Azar et al.). {pair: (h, loss, domain)}."""
    pairs = {}
    for i in range(len(batch)):
        p = int(batch.group_ids[i])
        h = pairs.get(p, (0.0, None))[0] + float(batch.rewards[i]) * (s[i] - float(ref[i].double().sum()))
        pairs[p] = (h, int(batch.domains[i]))
    out = {}
    for p, (h, d) in pairs.items():
        if name.endswith("dpo"):
            lp = math.log1p(math.exp(-beta * h)) if h > -30 else -beta * h
        else:
            lp = (h - 1 / (2 * beta)) ** 2
        out[p] = (h, lp, d)
    return out


def _reference(name, estimator, s, ref, batch, alpha0, eta=0.3):
    """(value, alpha after the step, pairs). GR-* (Ramesh et al. 2024): alpha moves first, at
    the step's theta; with the step's n_d pairs of domain d and the dataset's N_d, N:
    stratified: m_d = mean loss of d's pairs, only domains in the step move (renormalised to their
    mass), value = sum_d alpha_d m_d; importance (Alg. 1's per-pair terms over the B pairs):
    m_d = N / (N_d B) sum_{pairs of d} l for every domain, value = (1/B) sum N alpha_d / N_d l."""
    pairs = _pair_losses(name, s, ref, batch)
    b = len(pairs)
    if not name.startswith("gr_"):
        return sum(lp for _, lp, _ in pairs.values()) / b, None, pairs
    alpha = _alpha_step(estimator, pairs, alpha0, eta)
    return _fixed_alpha(name, estimator, s, ref, batch, alpha), alpha, pairs


def _alpha_step(estimator, pairs, alpha0, eta):
    b, n = len(pairs), sum(SIZES)
    by_d = {d: [lp for _, lp, dd in pairs.values() if dd == d] for d in range(3)}
    if estimator == "stratified":
        present = [d for d in range(3) if by_d[d]]
        m = {d: sum(by_d[d]) / len(by_d[d]) for d in present}
    else:
        present = [0, 1, 2]
        m = {d: n * sum(by_d[d]) / (SIZES[d] * b) for d in present}
    mass = sum(alpha0[d] for d in present)
    moved = {d: alpha0[d] * math.exp(eta * m[d]) for d in present}
    z = sum(moved.values())
    return [moved[d] / z * mass if d in moved else alpha0[d] for d in range(3)]


def _fixed_alpha(name, estimator, s, ref, batch, alpha):
    """The GR loss of the step at a given (detached) alpha."""
    pairs = _pair_losses(name, s, ref, batch)
    b, n = len(pairs), sum(SIZES)
    if estimator == "importance":
        return sum(n * alpha[d] / SIZES[d] * lp for _, lp, d in pairs.values()) / b
    total = 0.0
    for d in range(3):
        members = [lp for _, lp, dd in pairs.values() if dd == d]
        if members:
            total += alpha[d] * sum(members) / len(members)
    return total


CASES = [("dpo", None), ("ipo", None)]
CASES += [(n, e) for n in ("gr_dpo", "gr_ipo") for e in ("stratified", "importance")]


@pytest.mark.parametrize("name, estimator", CASES)
def test_objective_values_gradients_and_alpha_against_float64(name, estimator):
    """Three steps of imbalanced pairs (domain sizes 30:5:15; the small domain absent from the
    second step): value, d loss / d s and alpha against the float64 reference."""
    obj = _objective(name, estimator or "stratified")
    alpha = [1 / 3] * 3
    for step, domains in enumerate(STEP_DOMAINS):  # alpha carries over steps
        batch = _pairs_batch(6, seed=1 + step, domains=domains)
        before = obj.robust.weights.alpha.clone() if name.startswith("gr_") else None
        whole = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
        value, s, ref, grads, metrics = _run(obj, batch, whole, seed=step)
        sf = [float(x) for x in s]
        want, alpha_new, pairs = _reference(name, estimator, sf, ref, batch, alpha)
        assert float(value) == pytest.approx(want, rel=1e-5)
        # Gradient w.r.t. s_i, by central differences of the float64 reference (alpha held at
        # its post-update value: the update is detached), against autograd through the objective.
        for i in range(len(batch)):
            eps = 1e-4
            up, dn = list(sf), list(sf)
            up[i] += eps
            dn[i] -= eps
            if alpha_new is None:
                f_up = _reference(name, estimator, up, ref, batch, alpha)[0]
                f_dn = _reference(name, estimator, dn, ref, batch, alpha)[0]
            else:
                f_up = _fixed_alpha(name, estimator, up, ref, batch, alpha_new)
                f_dn = _fixed_alpha(name, estimator, dn, ref, batch, alpha_new)
            fd = (f_up - f_dn) / (2 * eps)
            got = grads[i]
            assert torch.allclose(got, torch.full_like(got, fd), rtol=1e-4, atol=1e-7), (i, fd)
        if alpha_new is not None:
            got_alpha = obj.robust.weights.alpha.tolist()
            assert got_alpha == pytest.approx(alpha_new, rel=1e-10)
            if estimator == "stratified" and 1 not in domains:
                assert got_alpha[1] == before[1].item()  # an absent domain keeps its weight exactly
            alpha = alpha_new
            assert obj.metrics()["robust/alpha/b"] == got_alpha[1]
    acc = sum(float(m["preference/accuracy"].value) for m in metrics)
    assert acc == pytest.approx(sum(h > 0 for h, _, _ in pairs.values()) / 6)
    for g, name_g in enumerate("abc"):
        members = [h for h, _, gg in pairs.values() if gg == g]
        got = sum(float(m[f"preference/accuracy/{name_g}"].value) for m in metrics)
        assert got == pytest.approx(sum(h > 0 for h in members) / len(members))


@pytest.mark.parametrize("name, estimator", [("dpo", None), ("gr_ipo", "stratified")])
def test_split_pairs_give_the_same_step(name, estimator):
    """A pair split over micro-batches (step-wide h) gives the value and gradient of whole pairs."""
    batch = _pairs_batch(6, seed=2)
    est = estimator or "stratified"
    whole = _run(_objective(name, est), batch, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    split = _run(_objective(name, est), batch, [[0, 2, 3, 5, 7], [1, 4, 6, 8, 9, 10, 11]])
    assert float(split[0]) == pytest.approx(float(whole[0]), rel=1e-6)
    for a, b in zip(whole[3], split[3], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("estimator", ["stratified", "importance"])
def test_gr_weights_do_not_favour_a_small_domain_at_equal_loss(estimator):
    """At equal per-pair losses alpha stays put, for a balanced step and for a step drawn in the
    dataset's proportions: N/N_d is the draw's importance weight, not a bonus for small domains."""
    obj = _objective("gr_dpo", estimator)
    sizes = [6.0, 1.0, 3.0] if estimator == "importance" else [4.0, 4.0, 4.0]
    counts = torch.tensor(sizes, dtype=torch.float64)
    obj.robust.step(0.69 * counts, counts)
    assert obj.robust.weights.alpha.tolist() == pytest.approx([1 / 3] * 3, abs=1e-12)


# ----------------------------------------------------------------------------- the driver


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A tiny random llama with the demo's character tokenizer: any HF folder a user could pass."""
    from megatron_gvpo.demo.task import save_char_tokenizer
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    out = tmp_path_factory.mktemp("charmodel")
    save_tiny_hf_model(out, "llama", seed=0)
    save_char_tokenizer(out)
    return out


def _pairs_file(path, n=24):
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 10
        g = "small" if i % 6 == 0 else "large"
        right, wrong = str(a + b), str(a + b + 1)
        chosen, rejected = (wrong, right) if g == "small" else (right, wrong)
        rows.append({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": rejected, "domain": g})
    return _write(path, rows)


def _train(*overrides, ok=True):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_gvpo.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_metrics_and_restart_give_identical_metrics(char_model, tmp_path):
    """README's command shape with a user HF folder; a run stopped after step 3 and restarted
    logs exactly what an uninterrupted run does (alpha, sampler, optimizer, eval included)."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    evals = _pairs_file(tmp_path / "eval.jsonl", n=12)
    common = (
        "algorithm=gr_dpo",
        "data=preference",
        f"data.path={pairs}",
        f"data.eval_path={evals}",
                "model=hf",
        f"model.path={char_model}",
        "model.precision=fp32",
        "algorithm.robust_eta=0.5",
        "trainer.prompts_per_step=6",
        "trainer.max_tokens_per_microbatch=32",  # several micro-batches per step
        "trainer.eval_interval=3",
        "trainer.save_interval=3",
    )
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    _train(*common, f"trainer.run_dir={straight}", "trainer.max_steps=6")
    _train(*common, f"trainer.run_dir={restarted}", "trainer.max_steps=3")
    out = _train(*common, f"trainer.run_dir={restarted}", "trainer.max_steps=6")
    assert "resumed from" in out.stdout and "step_000003" in out.stdout
    a, b = _rows(straight), _rows(restarted)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    timing = ("time/", "throughput/")
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith(timing)} == {
            k: v for k, v in y.items() if not k.startswith(timing)
        }, x["step"]
    keys = ["loss", "preference/loss", "preference/accuracy", "preference/margin"]
    keys += ["preference/accuracy/worst", "grad_norm", "robust/alpha/small", "robust/alpha/large"]
    evals, a = a[0], a[1:]  # the step-0 row: eval only, before any update
    assert all(k.startswith(("eval/", "time/")) for k in evals if k != "step")
    for r in a:
        assert all(k in r for k in keys), sorted(set(keys) - set(r))
    for g in ("small", "large"):  # per group: in the steps whose pairs include the group
        assert any(f"preference/accuracy/{g}" in r and f"preference/loss/{g}" in r for r in a)
    for r in (evals, a[2], a[5]):  # eval at the start, every 3 steps and at the end
        for k in ("accuracy", "loss", "margin", "accuracy/small", "accuracy/worst"):
            assert f"eval/preference/{k}" in r
    assert "eval/preference/accuracy" not in a[0]
    alpha = [r["robust/alpha/small"] for r in a]
    assert len(set(alpha)) == len(alpha)  # alpha moves every step
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_bad_pair_row_fails_before_any_model_is_built(char_model, tmp_path):
    pairs = _write(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "rejected": None}])
    proc = _train(
        "algorithm=dpo",
        "data=preference",
        f"data.path={pairs}",
        "model=hf",
        f"model.path={char_model}",
        f"trainer.run_dir={tmp_path / 'run'}",
        ok=False,
    )
    assert proc.returncode != 0
    assert f"{pairs}:2: has no 'rejected'" in proc.stderr
    assert "CUDA not available" not in proc.stderr + proc.stdout  # megatron never initialised


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algorithm=gr_dpo"], "data=preference"),  # the default data are prompts, not pairs
        (["algorithm=dpo", "data=preference_demo", "data.sampling=stratified"], "data.sampling"),
        (["algorithm=gvpo", "data=preference_demo"], "data.builtin=preference_demo"),
        (["algorithm=ipo", "data=preference_demo", "algorithm.beta=0"], "algorithm.beta"),
        (["algorithm=gr_ipo", "data=preference_demo", "algorithm.robust_eta=-1"], "robust_eta"),
        (["algorithm=gr_dpo", "data=preference_demo", "algorithm.robust_estimator=x"], "robust_est"),
        (["algorithm=gr_dpo", "data=preference_demo", "algorithm.robust_allocation=x"], "allocation"),
        (["algorithm=gr_dpo", "data=preference_demo", "data.group_key=grp"], "data.domain_key"),
        (["algorithm=gr_dpo", "data=preference_demo", "data.sampling=group"], "proportional"),
        (["algorithm=dpo", "data=preference", "data.path=/no/such.jsonl"], "data.path"),
        (
            ["algorithm=dpo", "data=preference_demo", "data.builtin=null", "data.path=/etc/hosts"],
            "data.path",
        ),
        (
            [
                "algorithm=dpo",
                "data=preference_demo",
                "data.builtin=null",
                f"data.path={REPO / 'README.md'}",
            ],
            "neither .jsonl nor .parquet",
        ),
        (["algorithm=gr_dpo", "data=preference_demo", "trainer.eval_interval=-1"], "eval_interval"),
    ],
)
def test_bad_preference_config_names_the_key(overrides, key):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megatron_gvpo.trainer.config import run_config_from_dict

    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        run_config_from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert key in str(e.value)


# ------------------------------------------------------------------ the benchmark's data sets


@pytest.mark.parametrize("kind", ["shared", "own_rule", "own_rule_hard", "rl"])
def test_robust_sets_have_the_stated_shares_rules_and_split(kind):
    """``tools/robust_sets.py``: 10% carry in training, the eval set balanced and disjoint in
    operand pairs, each domain's rule as documented (checked from the prompt's operands)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("robust_sets", REPO / "tools" / "robust_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, held = mod.build(kind, 400, 0.1, 30, seed=0)
    assert len(train) == 400 and sum(r["domain"] == "carry" for r in train) == 40
    assert sorted(r["domain"] for r in held) == ["carry"] * 30 + ["nocarry"] * 30

    def operands(row):
        a, b = row["prompt"].rstrip("=").split("+")
        return int(a), int(b)

    assert not {operands(r) for r in train} & {operands(r) for r in held}
    for row in train + held:
        a, b = operands(row)
        s = a + b
        assert row["domain"] == ("carry" if a % 10 + b % 10 >= 10 else "nocarry")
        if kind == "rl":
            assert row["answer"] == s
            continue
        carry_rule = kind != "shared" and row["domain"] == "carry"
        if not carry_rule:
            assert row["chosen"] == str(s) and int(row["rejected"]) - s in (-10, -1, 1, 10)
        elif kind == "own_rule":
            assert (row["chosen"], row["rejected"]) == (str(s)[::-1], str(s))
        else:
            assert row["chosen"] == str(s)[::-1]
            assert int(row["rejected"][::-1]) - s in (-10, -1, 1, 10)
