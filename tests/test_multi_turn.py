"""Multi-turn rollouts (``rollout/env.py``, ``rollout/turns.py``) and the loss mask through the
batch (``data/batching.py``, ``trainer/batch.py``, the objectives).

References: the ids each engine received (a recording proxy around the local engine; the
SGLang protocol fake's request log), a BPE tokenizer on which an observation glued to the turn
before it re-tokenises differently, and float64 GVPO / GRPO formulas written here from the papers
with the mask applied by hand.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_gvpo.data.batching import pack_sequences
from megatron_gvpo.models.forward import MicroBatch
from megatron_gvpo.rollout.base import GenerateRequest, RolloutEngine, SamplingParams
from megatron_gvpo.rollout.env import load_env
from megatron_gvpo.rollout.turns import ObservationEncoder, TurnRunner, TurnSettings

sys.path.insert(0, str(Path(__file__).parent))

VOCAB = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5}


def bpe_tokenizer():
    """Five symbols and one merge: "a" then "b" is one token ("ab") when tokenised together."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(dict(VOCAB), [("a", "b")], unk_token=None))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def bpe_engine(tmp_path_factory):
    from megatron_gvpo.models.tiny import save_tiny_hf_model
    from megatron_gvpo.rollout.local import LocalEngine

    path = save_tiny_hf_model(
        tmp_path_factory.mktemp("bpe") / "m", "llama", vocab_size=len(VOCAB), eos_token_id=1,
        bos_token_id=0, pad_token_id=0,
    )
    tok = bpe_tokenizer()
    return LocalEngine(path, tokenizer=tok), tok


class Recording(RolloutEngine):
    """Passes calls to ``inner`` and records every (input ids, output ids, logprobs)."""

    def __init__(self, inner: RolloutEngine):
        self.inner, self.calls = inner, []

    def generate(self, requests, sampling):
        out = self.inner.generate(requests, sampling)
        for req, group in zip(requests, out, strict=True):
            for s in group:
                self.calls.append((list(req.prompt_ids), list(s.response_ids), list(s.logprobs)))
        return out

    def update_weights(self, buckets, version):
        self.inner.update_weights(buckets, version)

    @property
    def weight_version(self):
        return self.inner.weight_version

    def health(self):
        return True

    def shutdown(self):
        pass


class ObserveB:
    """Observation "b" after every turn; done after ``row["turns"]`` turns; reward 1 per turn."""

    def __init__(self, row):
        self.turns, self.n = row.get("turns", 3), 0

    def reset(self):
        return "c"

    def step(self, action):
        self.n += 1
        return "b", 1.0, self.n >= self.turns


class Never:
    """Never done; long observations."""

    def __init__(self, row):
        self.row = row

    def reset(self):
        return None

    def step(self, action):
        return "bbbb", 0.5, False


class Faulty:
    """Row ``mode``: raise in step, hang in step, raise in the constructor, or behave."""

    def __init__(self, row):
        if row["mode"] == "init":
            raise RuntimeError("cannot build")
        self.mode = row["mode"]

    def reset(self):
        return None

    def step(self, action):
        if self.mode == "raise":
            raise ValueError("tool crashed")
        if self.mode == "hang":
            time.sleep(5)
        if self.mode == "bad":
            return "b", float("nan"), False
        return None, 2.0, True


def _runner(env, tok, **kw) -> TurnRunner:
    return TurnRunner(env, tok, TurnSettings(**kw))


# ------------------------------------------------------------------------------ the contract


def test_env_spec_errors_name_rollout_env(tmp_path):
    bad = tmp_path / "envs.py"
    bad.write_text("class NoStep:\n    def reset(self):\n        return None\nVALUE = 3\n")
    cases = {
        "no_colon": "must look like",
        f"{tmp_path}/missing.py:Env": "does not exist",
        f"{bad}:Missing": "has no attribute",
        f"{bad}:NoStep": "has no step",
        "not_a_module_xyz:Env": "not found",
    }
    for spec, why in cases.items():
        with pytest.raises(ValueError, match=why) as e:
            load_env(spec)
        assert "rollout.env" in str(e.value) and "\n" not in str(e.value)
    assert load_env(f"{Path(__file__)}:ObserveB").__name__ == "ObserveB"
    assert load_env("test_multi_turn:Never").__name__ == "Never"


def test_config_checks_name_the_rollout_key():
    from megatron_gvpo.trainer.config import run_config_from_dict

    base = {"trainer": {"max_steps": 1}, "rollout": {"n_samples_per_prompt": 2},
            "data": {"builtin": "toy_addition"}}
    with pytest.raises(ValueError, match=r"rollout\.max_turns=3 .* needs rollout\.env"):
        run_config_from_dict({**base, "rollout": {"max_turns": 3}})
    with pytest.raises(ValueError, match="rollout.env"):
        run_config_from_dict({**base, "rollout": {"env": "nowhere_xyz:Env"}})
    env = f"{Path(__file__)}:ObserveB"
    with pytest.raises(ValueError, match="rollout.env_observation_role='system'"):
        run_config_from_dict({**base, "rollout": {"env": env, "env_observation_role": "system"}})
    with pytest.raises(ValueError, match="max_tokens_per_microbatch=64 cannot hold .*max_total"):
        run_config_from_dict({
            **base, "trainer": {"max_steps": 1, "max_tokens_per_microbatch": 64},
            "rollout": {"env": env, "max_total_tokens": 80},
        })
    with pytest.raises(ValueError, match="reward.rewards is empty"):
        run_config_from_dict({**base, "reward": {"rewards": []}})
    cfg = run_config_from_dict({**base, "reward": {"rewards": []},
                                "rollout": {"env": env, "max_turns": 3}})
    assert cfg.rollout.response_room == 3 * cfg.rollout.max_new_tokens


# --------------------------------------------------------------------- token-in/token-out


def _check_token_in_token_out(calls, trajs, prompt):
    """Every turn's request was the prompt plus the trajectory so far; every model token is
    the engine's, in order, with its logprob; observations hold the rest. Each engine call is
    one turn of one trajectory."""
    left = list(calls)
    for t in trajs:
        full = prompt + t.response_ids
        starts = [k for k in range(len(t.loss_mask))
                  if t.loss_mask[k] and (k == 0 or not t.loss_mask[k - 1])]
        assert len(starts) == t.turns
        for n, k in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(full)
            turn = [x for x, m in zip(t.response_ids[k:end], t.loss_mask[k:end], strict=True) if m]
            match = [c for c in left if c[0] == full[: len(prompt) + k] and c[1] == turn]
            assert match, f"no engine call saw prefix {full[: len(prompt) + k]} and sent {turn}"
            left.remove(match[0])
            assert t.logprobs[k : k + len(turn)] == pytest.approx(match[0][2])
        packed = pack_sequences([prompt], [t.response_ids], 64, loss_masks=[t.loss_mask])
        n = len(full)
        assert packed.tokens[0, :n].tolist() == full  # what the actor's forward reads
        assert packed.response_mask[0, : len(t.loss_mask)].tolist() == [bool(m) for m in t.loss_mask]
    assert not left  # and the engine did nothing else


def test_local_engine_trajectory_is_the_ids_the_engine_saw(bpe_engine):
    engine, tok = bpe_engine
    rec = Recording(engine)
    prompt = [2, 4]
    runner = _runner(ObserveB, tok, max_turns=4, max_total_tokens=60)
    [trajs] = runner.run(rec, [GenerateRequest(prompt, 6, seed=3)], [{"turns": 3}],
                         SamplingParams(max_new_tokens=4))
    _check_token_in_token_out(rec.calls, trajs, prompt)
    for t in trajs:
        assert t.turns == 3 and t.env_reward == 3.0 and not t.truncated and t.env_error is None
        # reset's "c", then "b" after turns 1 and 2 (not after the last: done), each mask 0
        obs = [x for x, m in zip(t.response_ids, t.loss_mask, strict=True) if not m]
        assert obs == [VOCAB["c"], VOCAB["b"], VOCAB["b"]]
        assert t.text == tok.decode([x for x, m in zip(t.response_ids, t.loss_mask,
                                                        strict=True) if m],
                                    skip_special_tokens=True)
    # An observation "b" after a turn ending in "a" would re-tokenise into "ab": the actor
    # trains on the engine's ids, not on the text re-tokenised.
    glued = [t for t in trajs if tok.encode(tok.decode(t.response_ids), add_special_tokens=False)
             != t.response_ids]
    assert glued, "the seeded rollouts contain no turn ending in 'a' before an observation"


def test_sglang_fake_trajectory_is_the_ids_the_server_saw():
    from sglang_fake_server import FakeSGLangServer

    from megatron_gvpo.demo.task import build_char_tokenizer
    from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine

    tok = build_char_tokenizer()
    prompt = [5, 6, 7]
    fast = dict(health_poll_s=0.05, health_timeout_s=2.0, connect_timeout_s=1.0,
                request_timeout_s=5.0, backoff_s=0.01, backoff_max_s=0.05, max_concurrency=8)
    with FakeSGLangServer() as fake, SGLangEngine(SGLangConfig(urls=[fake.url], **fast)) as eng:
        runner = _runner(ObserveB, tok, max_turns=3, max_total_tokens=80)
        [trajs] = runner.run(eng, [GenerateRequest(prompt, 3, seed=9)], [{"turns": 3}],
                             SamplingParams(max_new_tokens=5))
        bodies = [e for e in fake.state.log if e["path"] == "/generate"]
    calls = []
    for e in bodies:
        from sglang_fake_server import fake_tokens

        ids, lps, _, _ = fake_tokens(e["body"]["input_ids"], e["body"]["sampling_params"])
        calls.append((e["body"]["input_ids"], ids, lps))  # what the server answered
    assert len(bodies) == sum(t.turns for t in trajs) == 9
    _check_token_in_token_out(calls, trajs, prompt)


class SlowFirstStep:
    """Two turns; the first ``step`` sleeps ``row["slow_s"]``; the times steps end are listed
    under ``(row["key"], turn)`` in ``ends``."""

    ends: dict = {}

    def __init__(self, row):
        self.slow_s, self.key, self.n = row["slow_s"], row["key"], 0

    def reset(self):
        return None

    def step(self, action):
        self.n += 1
        if self.n == 1:
            time.sleep(self.slow_s)
        SlowFirstStep.ends.setdefault((self.key, self.n), []).append(time.monotonic())
        return "b", 1.0, self.n >= 2


_FAST_SGLANG = dict(health_poll_s=0.05, health_timeout_s=2.0, connect_timeout_s=1.0,
                    request_timeout_s=5.0, backoff_s=0.01, backoff_max_s=0.05, max_concurrency=8)


def test_sglang_sends_each_next_turn_as_its_step_ends_not_after_the_wave():
    """SGLang batches continuously: a trajectory whose step is fast has its second turn on the
    server while another trajectory's slow (1 s) step still runs. The negative control, the same
    engine driven in waves, sends it only after the slow step; both give the same trajectories
    (ids, masks, logprobs, rewards) in request and response order."""
    from sglang_fake_server import FakeSGLangServer

    from megatron_gvpo.demo.task import build_char_tokenizer
    from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine

    tok = build_char_tokenizer()
    slow, fast = [5, 6, 7], [8, 9]
    reqs = [GenerateRequest(slow, 2, seed=4), GenerateRequest(fast, 2, seed=5)]
    rows = [{"slow_s": 1.0, "key": "slow"}, {"slow_s": 0.0, "key": "fast"}]
    runner = _runner(SlowFirstStep, tok, max_turns=3, max_total_tokens=40)
    results, second_turns = {}, {}
    with FakeSGLangServer() as fake, SGLangEngine(SGLangConfig(urls=[fake.url],
                                                               **_FAST_SGLANG)) as eng:
        assert eng.continuous_batching
        for mode in ("each", "waves"):
            eng.continuous_batching = mode == "each"  # "waves": the engine-independent loop
            SlowFirstStep.ends.clear()
            fake.state.log.clear()
            results[mode] = runner.run(eng, reqs, rows, SamplingParams(max_new_tokens=4))
            bodies = [e for e in fake.state.log if e["path"] == "/generate"]
            assert len(bodies) == 8  # 4 trajectories x 2 turns
            second_turns[mode] = [e["at"] for e in bodies
                                  if e["body"]["input_ids"][:2] == fast
                                  and len(e["body"]["input_ids"]) > len(fast)]
            assert len(second_turns[mode]) == 2
            slow_step_end = min(SlowFirstStep.ends["slow", 1])  # the first slow step to end
            if mode == "each":
                assert max(second_turns[mode]) < slow_step_end - 0.5
            else:  # the wave waits for the slowest step before any second turn goes out
                assert min(second_turns[mode]) >= slow_step_end
    for a_group, b_group in zip(results["each"], results["waves"], strict=True):
        for a, b in zip(a_group, b_group, strict=True):
            assert (a.prompt_ids, a.response_ids, a.loss_mask, a.logprobs, a.turns, a.env_reward) \
                == (b.prompt_ids, b.response_ids, b.loss_mask, b.logprobs, b.turns, b.env_reward)
    assert [t.prompt_ids for g in results["each"] for t in g] == [slow, slow, fast, fast]
    assert results["each"][0][0].response_ids != results["each"][0][1].response_ids  # seeds differ


def test_a_turn_the_sglang_engine_gives_up_on_fails_the_rollout():
    """A turn whose ``/generate`` fails past ``max_retries`` raises out of the turn loop, as a
    failed round does, and the turns still queued are cancelled."""
    from sglang_fake_server import FakeSGLangServer

    from megatron_gvpo.demo.task import build_char_tokenizer
    from megatron_gvpo.rollout.sglang import SGLangConfig, SGLangEngine
    from megatron_gvpo.rollout.sglang.client import SGLangError

    tok = build_char_tokenizer()
    with FakeSGLangServer(fail_generate=1, generate_delay_s=0.05) as fake:
        cfg = SGLangConfig(urls=[fake.url], **{**_FAST_SGLANG, "max_concurrency": 1},
                           max_retries=0)
        with SGLangEngine(cfg) as eng:
            runner = _runner(ObserveB, tok, max_turns=3, max_total_tokens=40)
            with pytest.raises(SGLangError, match="failed 1 times"):
                runner.run(eng, [GenerateRequest([5, 6], 6, seed=1)], [{"turns": 3}],
                           SamplingParams(max_new_tokens=4))
            time.sleep(0.3)
            # one failed, at most the one then running finished: the other four never went out
            assert fake.state.generates <= 2


def test_default_submit_is_generate_for_one_request(bpe_engine):
    engine, _ = bpe_engine
    assert not engine.continuous_batching
    req, sp = GenerateRequest([2, 4], 3, seed=7), SamplingParams(max_new_tokens=4)
    fut = engine.submit(req, sp)
    assert fut.done()
    got = [s.response_ids for s in fut.result()]
    assert got == [s.response_ids for s in engine.generate([req], sp)[0]]


# ---------------------------------------------------------------------------- where it ends


def test_max_turns_and_max_total_tokens_cut_and_flag(bpe_engine):
    engine, tok = bpe_engine
    sampling = SamplingParams(max_new_tokens=3)
    [trajs] = _runner(Never, tok, max_turns=2, max_total_tokens=100).run(
        engine, [GenerateRequest([2], 3, seed=1)], [{}], sampling)
    for t in trajs:
        assert t.turns == 2 and t.truncated and t.env_reward == 1.0
        assert t.loss_mask[-1] == 1  # the last turn's observation is not appended
        assert t.env_tokens == 4  # one observation "bbbb" between the two turns
    [trajs] = _runner(Never, tok, max_turns=10, max_total_tokens=9).run(
        engine, [GenerateRequest([2], 3, seed=1)], [{}], sampling)
    for t in trajs:
        assert t.truncated and len(t.response_ids) == 9 and t.turns < 10


def test_env_errors_and_timeouts_fail_the_sample_and_are_counted(bpe_engine):
    from megatron_gvpo.data.prompts import Prompt
    from megatron_gvpo.trainer.groups import filter_groups, rollout_and_score

    engine, tok = bpe_engine
    modes = ["ok", "raise", "hang", "init", "bad"]
    rows = [Prompt([2, 4], "ac", None, None, {"mode": m}, f"row{i}") for i, m in enumerate(modes)]
    runner = _runner(Faulty, tok, max_turns=2, max_total_tokens=20, env_timeout_s=0.5)
    start = time.perf_counter()
    result = rollout_and_score(engine, None, rows, SamplingParams(max_new_tokens=3), 2,
                               list(range(5)), turns=runner)
    assert time.perf_counter() - start < 4  # the hung steps were abandoned, concurrently
    failed = [g.reward_failed for g in result.groups]
    assert failed == [[False] * 2, [True] * 2, [True] * 2, [True] * 2, [True] * 2]
    assert result.groups[0].rewards == [2.0, 2.0]  # env reward, reward.rewards=[]
    m = result.metrics
    assert m["env/errors"] == 6 and m["env/timeouts"] == 2 and m["rollout/turns/max"] == 1
    metrics: dict = {}
    kept = filter_groups(result.groups, 1, False, True, metrics)
    assert [len(g.responses) for g in kept] == [2, 0, 0, 0, 0]


def test_observation_role_wraps_with_the_chat_template():
    from megatron_gvpo.demo.task import build_char_tokenizer

    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="env_observation_role=tool needs a tokenizer"):
        ObservationEncoder(tok, "tool")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    enc = ObservationEncoder(tok, "tool")
    plain = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # After a turn cut by a stop string the template's end of turn comes first ...
    assert enc.encode("42", last_model_token=plain("x")[0]) == plain("</s><|tool|>42</s><|assistant|>")
    # ... after the model's own EOS it is not repeated.
    assert enc.encode("42", last_model_token=tok.eos_token_id) == plain("<|tool|>42</s><|assistant|>")
    assert ObservationEncoder(tok, None).encode("42") == plain("42")


# ------------------------------------------------------------------- the loss mask, exactly


def _trajectory_batch(masked: bool):
    """Two groups of two-turn trajectories (turn, observation, turn); theta' logprobs hold
    garbage on observation tokens, which a masked loss must never read."""
    from megatron_gvpo.trainer.batch import RolloutBatch

    g = torch.Generator().manual_seed(7)
    prompts, responses, masks, old = [], [], [], []
    for i, (t1, obs, t2) in enumerate([(3, 2, 4), (2, 3, 2), (4, 1, 3), (1, 2, 2), (3, 3, 1)]):
        prompts.append([1 + i, 2, 3])
        responses.append([5 + (k % 7) for k in range(t1 + obs + t2)])
        masks.append(torch.tensor([1] * t1 + [0] * obs + [1] * t2, dtype=torch.bool))
        o = -torch.rand(t1 + obs + t2, generator=g) - 0.2
        o[~masks[-1]] = 50.0  # garbage where the environment wrote
        old.append(o)
    return RolloutBatch(
        prompt_ids=prompts,
        response_ids=responses,
        group_ids=torch.tensor([0, 0, 1, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0]),
        old_logprobs=old,
        loss_masks=masks if masked else None,
    )


def _micro_batches(batch, monkeypatch):
    from megatron_gvpo.data.batching import plan_step
    from megatron_gvpo.trainer import batch as batch_mod

    monkeypatch.setattr(batch_mod.parallel_state, "get_data_parallel_rank", lambda: 0)
    plan = plan_step(batch.lengths, batch.group_ids.tolist(), 1, 4096)
    return plan, batch_mod.build_micro_batches(batch, plan)


def _positions(batch, i, mb):
    """(logprob-row position, is a model token) of sample i's response tokens in the packed
    row of ``mb`` (which holds every sample, in the order of its ``sample_ids``)."""
    order = mb.extra["sample_ids"].tolist()
    start = sum(batch.lengths[j] for j in order[: order.index(i)])
    p = len(batch.prompt_ids[i])
    mask = batch.loss_masks[i].tolist() if batch.loss_masks is not None else None
    return [(start + p - 1 + k, True if mask is None else bool(mask[k]))
            for k in range(len(batch.response_ids[i]))]


def _row(mb: MicroBatch) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (-torch.rand(1, mb.tokens.shape[1] - 1, generator=g, dtype=torch.float64) - 0.1)


def test_gvpo_trajectory_loss_and_gradient_use_model_tokens_only(monkeypatch):
    from megatron_gvpo.trainer.objectives.gvpo import GVPOMicroBatchLoss

    beta = 0.1
    batch = _trajectory_batch(masked=True)
    _, [mb] = _micro_batches(batch, monkeypatch)
    row = _row(mb).requires_grad_(True)
    loss, _ = GVPOMicroBatchLoss(beta, num_groups=2)(row, None, mb)
    loss.backward()

    # float64 reference, GVPO's definition with s, s' summed over model tokens only
    r = row.detach()
    s, s_old = [], []
    for i in range(len(batch)):
        pos = _positions(batch, i, mb)
        s.append(sum(float(r[0, q]) for q, m in pos if m))
        s_old.append(sum(float(batch.old_logprobs[i][k]) for k, (_, m) in enumerate(pos) if m))
    want_loss, want_grad = 0.0, torch.zeros_like(r)
    for members in ([0, 1], [2, 3, 4]):
        k = len(members)
        d = {i: beta * (s[i] - s_old[i]) for i in members}
        d_mean = sum(d.values()) / k
        r_mean = sum(float(batch.rewards[i]) for i in members) / k
        for i in members:
            c = (d[i] - d_mean) - (float(batch.rewards[i]) - r_mean)
            want_loss += c * c / (2 * (k - 1)) / 2
            for q, m in _positions(batch, i, mb):
                if m:
                    want_grad[0, q] = beta * c / ((k - 1) * 2)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-6)  # s' is float32
    torch.testing.assert_close(row.grad, want_grad, rtol=1e-6, atol=1e-9)
    obs = [q for i in range(len(batch)) for q, m in _positions(batch, i, mb) if not m]
    assert obs and row.grad[0, obs].abs().max() == 0  # observations get no gradient

    # Negative control: the same trajectories without the mask train on observation tokens.
    plain = _trajectory_batch(masked=False)
    _, [mb2] = _micro_batches(plain, monkeypatch)
    row2 = _row(mb2).requires_grad_(True)
    loss2, _ = GVPOMicroBatchLoss(beta, num_groups=2)(row2, None, mb2)
    loss2.backward()
    assert abs(float(loss2.detach()) - want_loss) > 1e-3
    assert row2.grad[0, obs].abs().min() > 0


@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_grpo_family_ratios_and_normalisers_count_model_tokens_only(name, monkeypatch):
    from megatron_gvpo.trainer.objectives import StepInputs, algorithm_config, build_objective

    batch = _trajectory_batch(masked=True)
    for i, o in enumerate(batch.old_logprobs):  # theta' near theta: some ratios clip
        o[batch.loss_masks[i]] = -0.5 - 0.05 * i
    objective = build_objective(algorithm_config(name=name, kl_beta=0.0))
    objective.prepare_round(batch)
    plan, [mb] = _micro_batches(batch, monkeypatch)
    row = (_row(mb) * 0.3 - 0.4).requires_grad_(True)
    loss_fn = objective.step_loss(StepInputs(batch, plan, [mb], lambda: None))
    loss, metrics = loss_fn(row, None, mb)
    loss.backward()

    eps_low, eps_high = (0.2, 0.2) if name == "grpo" else (0.2, 0.28)
    ref = row.detach().clone().requires_grad_(True)
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(len(batch)):
        adv = float(batch.advantages[i])
        terms = []
        for k, (q, m) in enumerate(_positions(batch, i, mb)):
            if not m:
                continue
            ratio = torch.exp(ref[0, q] - float(batch.old_logprobs[i][k]))
            terms.append(-torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv))
        per_seq.append(sum(terms) / len(terms))
        total, n_tok = total + sum(terms), n_tok + len(terms)
    want = sum(per_seq) / len(batch) if name == "grpo" else total / n_tok
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    torch.testing.assert_close(row.grad, ref.grad, rtol=1e-9, atol=1e-12)
    assert float(metrics["num_tokens"].value) == n_tok == batch.num_response_tokens


# ------------------------------------------------------------------------ the demo and a run


def test_calculator_env_answers_calls_and_rewards_the_answer():
    from megatron_gvpo.demo.calculator import Calculator

    env = Calculator({"answer": "52"})
    assert env.reset() is None
    assert env.step("I use calc(07+45)") == ("=52", 0.0, False)
    assert env.step("so 52") == (None, 1.0, True)
    assert Calculator({"answer": "52"}).step("53") == (None, 0.0, True)
    assert env.calls == 1


_TWO_TURN_ENV = '''
class TwoTurns:
    """A hint after the first turn, done after the second; a 7 in a turn earns 0.5."""

    def __init__(self, row):
        self.turn = 0

    def reset(self):
        return None

    def step(self, action):
        self.turn += 1
        return "\\nhint:", 0.5 * ("7" in action), self.turn >= 2
'''


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> Path:
    from megatron_gvpo.demo.task import build_char_tokenizer
    from megatron_gvpo.models.tiny import save_tiny_hf_model

    d = tmp_path_factory.mktemp("model") / "tiny"
    tok = build_char_tokenizer()
    save_tiny_hf_model(d, "llama", vocab_size=len(tok), num_hidden_layers=2)
    tok.save_pretrained(d)
    return d


def _train_two_turns(model: Path, tmp_path: Path, *overrides: str, run: str = "run",
                     steps: int = 2) -> list[dict]:
    """``python -m megatron_gvpo.train rollout.env=<TwoTurns> ...`` for ``steps`` steps of 2
    prompts x 4 trajectories; the training rows of its metrics.jsonl."""
    import os
    import subprocess

    from conftest import REPO

    (tmp_path / "two_turns.py").write_text(_TWO_TURN_ENV)
    run = tmp_path / run
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, env.get("PYTHONPATH")) if p)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "megatron_gvpo.train", f"model.path={model}",
        f"trainer.run_dir={run}", f"trainer.max_steps={steps}", "trainer.prompts_per_step=2",
        "trainer.updates_per_round=2", "rollout.n_samples_per_prompt=4", "trainer.plot=false",
        "data.builtin_size=32", "data.builtin_eval_size=0", "rollout.max_new_tokens=6",
        f"rollout.env={tmp_path / 'two_turns.py'}:TwoTurns", "rollout.max_turns=3",
        "rollout.max_total_tokens=40", "reward.rewards=[]", *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    assert len(rows) == steps
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_gvpo_trains_on_two_turn_trajectories_end_to_end(char_model, tmp_path, staleness):
    """``python -m megatron_gvpo.train rollout.env=...``: the actor's theta' logprobs on the
    model's tokens equal the engine's (the actor read the engine's ids; async: through the
    engine's own process), and the turn metrics are logged."""
    rows = _train_two_turns(
        char_model, tmp_path, f"trainer.async_training.max_staleness={staleness}"
    )
    for r in rows:
        assert r["rollout/turns/mean"] == 2 and r["rollout/turns/max"] == 2
        assert r["rollout/env_tokens/mean"] == 6  # "\nhint:" once, between the two turns
        assert 2 <= r["rollout/model_tokens/mean"] <= 12
        assert r["env/errors"] == 0 and r["env/timeouts"] == 0 and r["rollout/truncated"] == 0
        if staleness == 0 or r["step"] == 1:  # async round 2 was sampled by older weights
            assert r["rollout/logprob_abs_diff/max"] < 1e-4
        assert "time/env" in r and r["loss"] == r["loss"]


def test_masks_survive_replay_and_mix_with_unmasked_groups():
    from megatron_gvpo.trainer.groups import PromptGroup, to_batch
    from megatron_gvpo.trainer.replay import ReplayBuffer

    traj = PromptGroup([1, 2], [[5, 6, 7], [8, 9]], [1.0, 0.0], None, [[-1.0, 0.0, -2.0]] * 1
                       + [[-1.0, -1.0]], [False, False], [0, 0], [[1, 0, 1], [1, 1]])
    buf = ReplayBuffer(4)
    buf.add([traj.to_replay()])
    state = json.loads(json.dumps(buf.state_dict()))  # as checkpoints store it
    buf2 = ReplayBuffer(4)
    buf2.load_state_dict(state)
    back = PromptGroup.from_replay(buf2.groups[0])
    assert back.loss_masks == [[1, 0, 1], [1, 1]] and back.responses == traj.responses
    old = PromptGroup.from_replay(([3], [[4]], [0.5], None))  # a checkpoint from before masks
    assert old.loss_masks == []
    batch = to_batch([back, old, PromptGroup([3], [[4, 4]], [1.0])], ["default"])
    assert [m.tolist() for m in batch.loss_masks] == [
        [True, False, True], [True, True], [True], [True, True]
    ]
    assert batch.num_response_tokens == 2 + 2 + 1 + 2
    assert to_batch([old], ["default"]).loss_masks is None


def test_tool_demo_warm_start_rows_train_on_the_call_and_the_copy_not_the_result():
    from megatron_gvpo.demo.calculator import CALL, tool_rows
    from megatron_gvpo.demo.model import encode_examples
    from megatron_gvpo.demo.task import build_char_tokenizer, is_heldout

    rows = tool_rows(400, seed=0, tool_share=0.25)
    calls = [r for r in rows if "segments" in r]
    assert 60 < len(calls) < 140  # about a quarter
    for r in rows:
        a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
        assert not is_heldout(a, b, 3) and r["response"] == str(a + b)
    (call, _), (result, trained), (copy, _) = calls[0]["segments"]
    a, op, b = CALL.search(call).groups()
    assert result == f"={int(a) + int(b)}" and not trained and copy == str(int(a) + int(b))
    tok = build_char_tokenizer()
    ids, labels = encode_examples([calls[0]], tok)
    text = calls[0]["prompt"] + call + result + copy
    n = 1 + len(text) + 1  # BOS, characters, EOS
    assert ids[0, :n].tolist() == tok(text)["input_ids"] + [tok.eos_token_id]
    trained_at = [k for k in range(n) if labels[0, k] != -100]
    start = 1 + len(calls[0]["prompt"])
    want = [*range(start, start + len(call)),
            *range(start + len(call) + len(result), n)]  # the copy and EOS; not the result
    assert trained_at == want


# ---------------------------------------------------------------------------- the tool helper


def _add(a: int, b: int = 0) -> int:
    """Add two integers.

    More words."""
    return a + b


def test_tool_calls_are_parsed_in_qwen3_and_llama3_formats():
    from megatron_gvpo.rollout.tools import ToolCall, parse_tool_calls, tool_schema

    qwen = ('Let me add.\n<tool_call>\n{"name": "_add", "arguments": {"a": 2, "b": 3}}\n'
            '</tool_call>\n<tool_call>\n{"name": "_add", "arguments": "{\\"a\\": 1}"}\n</tool_call>')
    assert parse_tool_calls(qwen, "qwen3") == [ToolCall("_add", {"a": 2, "b": 3}),
                                               ToolCall("_add", {"a": 1})]
    cut = '<tool_call>\n{"name": "_add", "arguments": {"a": 5}}\n'  # stopped before the tag
    assert parse_tool_calls(cut, "qwen3") == [ToolCall("_add", {"a": 5})]
    llama = '<|python_tag|>{"name": "_add", "parameters": {"a": 4, "b": 1}}; {"name": "x", "parameters": {}}'
    assert parse_tool_calls(llama, "llama3") == [ToolCall("_add", {"a": 4, "b": 1}),
                                                 ToolCall("x", {})]
    assert parse_tool_calls("the answer is 5 {not json}", "llama3") == []
    assert parse_tool_calls("no call here", "qwen3") == []
    with pytest.raises(ValueError, match="tool_format='gpt'"):
        parse_tool_calls("", "gpt")
    assert tool_schema(_add) == {"type": "function", "function": {
        "name": "_add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a"]}}}


def test_function_tool_env_runs_calls_and_returns_errors_to_the_model():
    from megatron_gvpo.rollout.tools import FunctionToolEnv

    class Adder(FunctionToolEnv):
        tools = [_add]

        def answer_reward(self, action):
            return float(str(self.row["answer"]) in action)

    env = Adder({"answer": 5})
    call = '<tool_call>{"name": "_add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert env.step(call) == ("5", 0.0, False)
    bad = '<tool_call>{"name": "_add", "arguments": {"c": 1}}</tool_call>'
    obs, reward, done = env.step(bad)
    assert obs.startswith("error: TypeError") and not done
    obs, _, _ = env.step('<tool_call>{"name": "mul", "arguments": {}}</tool_call>')
    assert obs == "error: unknown tool 'mul' (tools: _add)"
    assert env.step("it is 5") == (None, 1.0, True) and env.calls == 3


@pytest.mark.slow
@pytest.mark.one_leg
def test_trajectories_through_sglang_servers_against_the_protocol_fake(char_model, tmp_path):
    """The trainer's SGLang path with an environment: one ``/generate`` per turn (the servers
    are tests/sglang_fake_server.py, a PROTOCOL FAKE: fake tokens, no model)."""
    from conftest import REPO

    fake = [sys.executable, str(REPO / "tests" / "sglang_fake_server.py")]
    rows = _train_two_turns(
        char_model, tmp_path, "rollout=sglang", "rollout.max_new_tokens=6",
        "rollout.sglang.weight_sync=distributed", f"++rollout.sglang.launch_command=[{','.join(fake)}]",
        "++rollout.sglang.dist_backend=gloo", "++rollout.sglang.startup_timeout_s=60",
    )
    for r in rows:
        assert r["rollout/turns/mean"] == 2 and r["rollout/env_tokens/mean"] == 6
        assert r["rollout/model_tokens/mean"] == 12  # the fake stops at max_new_tokens
    assert rows[-1]["engine/generate_requests"] == 2 * (2 * 4 * 2)  # steps x trajectories x turns


@pytest.mark.slow
def test_a_resumed_run_with_replayed_trajectories_matches_an_uninterrupted_one(char_model, tmp_path):
    """Replayed groups keep their loss masks through the checkpoint: stopping after step 2 and
    resuming gives step 3 exactly as the uninterrupted run (replay draws stored trajectories)."""
    replay = ("trainer.replay_ratio=1.0", "trainer.save_interval=1")
    straight = _train_two_turns(char_model, tmp_path, *replay, run="straight", steps=3)
    _train_two_turns(char_model, tmp_path, *replay, run="split", steps=2)
    resumed = _train_two_turns(char_model, tmp_path, *replay, run="split", steps=3)
    keep = lambda row: {k: v for k, v in row.items()  # noqa: E731
                        if not k.startswith(("time/", "sync/", "throughput/", "rollout/generate_s",
                                             "rollout/tokens_per_s", "rollout/reward_busy_s"))}
    assert resumed[-1]["replay/groups"] == 2
    assert keep(resumed[-1]) == keep(straight[-1])
    # What the resumed run replayed: every stored trajectory kept its mask (the observation
    # "\nhint:" is 6 tokens between the two turns, each of which has at least one token).
    state = json.loads((tmp_path / "split/checkpoints/step_000002/trainer_state.json").read_text())
    groups = state["replay"]["groups"]
    assert len(groups) == 4  # two rounds of two prompts
    for _, responses, _, _, masks in groups:
        for resp, mask in zip(responses, masks, strict=True):
            assert len(mask) == len(resp) and mask.count(0) == 6 and mask[0] == mask[-1] == 1


def test_trajectory_routes_cover_every_token_the_engine_fed(tmp_path):
    """A tiny qwen3_moe through the embedded engine with routes (model.moe.routing_replay=
    rollout): a trajectory's routes (the last turn's request, which prefilled every earlier
    turn and observation) equal transformers' top-k of an independent forward of the whole
    trajectory, for every token but the last, also when the token budget cuts the last turn;
    in the batch the last token has no route (NO_ROUTE)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_moe

    from megatron_gvpo.models.routing_replay import NO_ROUTE, engine_layer_routes
    from megatron_gvpo.models.tiny import save_tiny_hf_model
    from megatron_gvpo.rollout.local import LocalEngine
    from megatron_gvpo.trainer.groups import PromptGroup, to_batch

    path = save_tiny_hf_model(
        tmp_path / "moe", "qwen3_moe", seed=4, vocab_size=len(VOCAB), eos_token_id=1,
        bos_token_id=0, pad_token_id=0,
    )
    tok = bpe_tokenizer()
    engine = LocalEngine(path, tokenizer=tok, return_routes=True)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    seen: list[torch.Tensor] = []
    original = hf_moe.Qwen3MoeTopKRouter.forward

    def spy(router, hidden):
        out = original(router, hidden)
        seen.append(out[2])
        return out

    cuts = 0
    for budget in (60, 7):
        [trajs] = _runner(ObserveB, tok, max_turns=3, max_total_tokens=budget).run(
            engine, [GenerateRequest([2, 4], 3, seed=5)], [{"turns": 3}],
            SamplingParams(max_new_tokens=4))
        for t in trajs:
            ids = t.prompt_ids + t.response_ids
            seen.clear()
            hf_moe.Qwen3MoeTopKRouter.forward = spy
            try:
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
            finally:
                hf_moe.Qwen3MoeTopKRouter.forward = original
            want = torch.stack(seen)[:, : t.routes.shape[1]]
            # the last token has a route only when the budget cut a longer turn after it
            assert t.loss_mask[-1] == 1 and t.routes.shape[1] in (len(ids) - 1, len(ids))
            assert torch.equal(t.routes.long().sort(-1).values, want.sort(-1).values)
            cuts += t.routes.shape[1] == len(ids)
        group = PromptGroup([2, 4], [t.response_ids for t in trajs], [0.0] * 3,
                            routes=[t.routes for t in trajs])
        batch = to_batch([group], ["default"], moe_layers=1)  # layer 1 (layer 0 is dense)
        for t, routes in zip(trajs, batch.routes, strict=True):
            n, length = t.routes.shape[1], len(t.prompt_ids) + len(t.response_ids)
            layer = engine_layer_routes(routes, 0, torch.empty(length, routes.shape[2], dtype=torch.long))
            assert layer.shape[0] == length
            assert (layer[n:] == NO_ROUTE).all() and (layer[:n] >= 0).all()
        # a report with another number of MoE layers fails on every rank, before any forward
        with pytest.raises(ValueError, match=r"expected \[2 MoE layers"):
            to_batch([group], ["default"], moe_layers=2)
    assert cuts  # the small budget did cut a turn
