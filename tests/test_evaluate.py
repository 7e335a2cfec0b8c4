"""Held-out evaluation (``trainer/evaluate.py``): metrics against hand-computed values and a
brute-force pass@k, the engine call it makes, the weight-version guard, the schedule and the
best-checkpoint bookkeeping, and the eval console line.

The engine here is a scripted ``RolloutEngine`` (our own contract, fixed responses per prompt);
the rewards are the real registry's demo reward. End-to-end runs (step-0 row, async, SGLang
protocol fake, best checkpoint, resume) are in ``test_trainer.py``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from megatron_gvpo.data.prompts import Prompt
from megatron_gvpo.demo.task import toy_reward, worked_answer
from megatron_gvpo.rewards import RewardManager
from megatron_gvpo.rollout.base import RolloutEngine, Sample
from megatron_gvpo.trainer.evaluate import (
    EvalSchedule,
    EvalSection,
    Evaluator,
    eval_set_config,
    pass_at_k,
)
from megatron_gvpo.trainer.logger import MetricsLogger, eval_summary


def test_pass_at_k_is_the_probability_that_a_random_k_subset_holds_a_correct_one():
    """Reference: enumerate every k-subset of n responses with c correct (float64 counting)."""
    for n in range(1, 9):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(labels, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


class ScriptedEngine(RolloutEngine):
    """Returns ``texts[prompt text][j]`` as response j; records the sampling it was asked for."""

    def __init__(self, texts: dict[str, list[str]], version: int):
        self.texts, self.version, self.calls = texts, version, []

    def generate(self, requests, sampling):
        self.calls.append((sampling, [r.n for r in requests], [r.seed for r in requests]))
        out = []
        for req in requests:
            prompt = "".join(chr(t) for t in req.prompt_ids)
            out.append([
                Sample(list(req.prompt_ids), [1] * len(t), t, [0.0] * len(t), "stop", self.version)
                for t in self.texts[prompt][: req.n]
            ])
        return out

    def update_weights(self, buckets, version):
        raise NotImplementedError

    @property
    def weight_version(self) -> int:
        return self.version

    def health(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def _prompt(text: str, answer: int, domain: str) -> Prompt:
    return Prompt([ord(c) for c in text], text, str(answer), domain, {}, "test")


# Three prompts, four responses each; the demo reward is 1 for the right last integer.
_SET = [_prompt("12+30=", 42, "nocarry"), _prompt("19+23=", 42, "carry"), _prompt("55+55=", 110, "carry")]
_TEXTS = {
    "12+30=": ["42", "41", worked_answer(12, 30), "x"],  # 2 of 4 right
    "19+23=": ["32", "32", "32", "32"],  # 0 of 4 (the carry forgotten)
    "55+55=": ["110", "110", "[5+5=10,5+5+1=11]110", "100"],  # 3 of 4
}


def test_metrics_of_a_scripted_set_against_hand_computed_values():
    rewards = RewardManager([{"name": "toy_addition"}])
    engine = ScriptedEngine(_TEXTS, version=3)
    cfg = EvalSection(temperature=1.0, n_samples=4)
    ev = Evaluator({"": (_SET, cfg)}, rollout_max_new_tokens=24, seed=5)
    m = ev.run(engine, rewards, version=3)
    # correct counts 2, 0, 3 of n = 4
    assert m["eval/accuracy"] == pytest.approx(5 / 12)
    assert m["eval/reward"] == pytest.approx(5 / 12)
    assert m["eval/accuracy/carry"] == pytest.approx(3 / 8)
    assert m["eval/accuracy/nocarry"] == pytest.approx(2 / 4)
    # pass@2 per prompt: 1 - C(4-c, 2)/C(4, 2) = 1 - 1/6, 0, 1; pass@4: 1, 0, 1
    assert m["eval/pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/mean@4"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    lengths = [len(t) for ts in _TEXTS.values() for t in ts]
    assert m["eval/response_length"] == pytest.approx(sum(lengths) / 12)
    assert m["eval/weight_version"] == 3 and m["eval/reward_failed"] == 0
    assert "eval/pass@1" not in m and "eval/pass@3" not in m
    sampling, ns, seeds = engine.calls[0]
    assert ns == [4, 4, 4] and sampling.temperature == 1.0 and sampling.max_new_tokens == 24
    # The same seeds at every evaluation (common random numbers across steps).
    ev.run(engine, rewards, version=3)
    assert engine.calls[1][2] == seeds
    # Cross-check the reward itself against the task's definition.
    assert [toy_reward(t, 110) for t in _TEXTS["55+55="]] == [1.0, 1.0, 1.0, 0.0]


def test_named_sets_have_their_own_settings_and_prefix():
    rewards = RewardManager([{"name": "toy_addition"}])
    engine = ScriptedEngine(_TEXTS, version=0)
    base = EvalSection()  # greedy, one response
    path, sampled = eval_set_config(base, "s4", {"path": "x.jsonl", "temperature": 1.0, "n_samples": 4})
    assert path == "x.jsonl" and sampled.n_samples == 4 and base.n_samples == 1
    ev = Evaluator({"": (_SET, base), "s4": (_SET, sampled)}, rollout_max_new_tokens=8)
    m = ev.run(engine, rewards, version=0)
    assert m["eval/accuracy"] == pytest.approx(2 / 3)  # first responses: 42, 32, 110
    assert "eval/pass@4" not in m and m["eval/s4/pass@4"] == pytest.approx(2 / 3)
    assert engine.calls[0][0].temperature == 0 and engine.calls[0][1] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"data\.eval_sets\.s4\.n_sample\b"):
        eval_set_config(base, "s4", {"path": "x", "n_sample": 4})
    with pytest.raises(ValueError, match=r"eval\.n_samples=4 with eval\.temperature=0"):
        eval_set_config(base, "s4", {"path": "x", "n_samples": 4})


def test_an_engine_holding_other_weights_is_refused():
    """Eval right after a sync must see the synced version; a stale engine (e.g. a round
    generated ahead) is an error, not a silently wrong row."""
    rewards = RewardManager([{"name": "toy_addition"}])
    ev = Evaluator({"": (_SET, EvalSection())}, rollout_max_new_tokens=8)
    with pytest.raises(RuntimeError, match="version"):
        ev.run(ScriptedEngine(_TEXTS, version=4), rewards, version=5)
    assert ev.run(ScriptedEngine(_TEXTS, version=5), rewards, version=5)["eval/accuracy"] > 0


def test_schedule_and_best_checkpoint_bookkeeping(tmp_path: Path):
    s = EvalSchedule(interval=3, at_start=True, max_steps=7, metric="eval/accuracy")
    assert [k for k in range(8) if s.due(k)] == [0, 3, 6, 7]
    assert not EvalSchedule(0, False, 7, None).due(0)
    assert [k for k in range(8) if EvalSchedule(0, False, 7, None).due(k)] == [7]
    assert s.improved(3, {"eval/accuracy": 0.5}) and s.best_step == 3
    assert not s.improved(6, {"eval/accuracy": 0.5})  # ties keep the earlier step
    assert not s.improved(6, {"eval/reward": 0.9})
    assert s.improved(7, {"eval/accuracy": 0.6}) and s.protected_steps() == {7}
    s.write_best(tmp_path)
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "step": 7, "path": "step_000007", "metric": "eval/accuracy", "value": 0.6,
    }
    low = EvalSchedule(1, True, 5, "eval/response_length", mode="min")
    assert low.improved(1, {"eval/response_length": 9.0})
    assert low.improved(2, {"eval/response_length": 8.0})
    assert not low.improved(3, {"eval/response_length": 8.5})
    again = EvalSchedule(1, True, 5, "eval/response_length", mode="min")
    again.load_state_dict(low.state_dict())
    assert not again.improved(4, {"eval/response_length": 8.5}) and again.best_step == 2


def test_eval_console_line_and_fresh_start_truncation(tmp_path: Path, capsys):
    row = {"eval/accuracy": 0.5, "eval/pass@4": 0.75, "eval/accuracy/carry": 0.25,
           "eval/reward": 0.5, "eval/response_length": 3.0, "eval/hard/accuracy": 0.125,
           "eval/hard/accuracy/carry": 0.0, "time/eval": 1.25}  # fmt: skip
    line = eval_summary(row)
    assert line == (
        "accuracy 0.500 | pass@4 0.750 | reward 0.500 | len 3.0 | hard: accuracy 0.125 | 1.2s"
    )
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log(0, row)
    logger.log(1, {"reward/mean": 0.25, "loss": 1.0})
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out == [f"eval step 0: {line}", "step 1: reward 0.250 | loss 1"]
    # TensorBoard holds every finite number of each step as a scalar (one event per step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    numbers = {k for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    assert set(events.Tags()["scalars"]) == numbers | {"reward/mean", "loss"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25)]
    # A fresh start (no checkpoint: resume step 0) drops every row, the step-0 eval row included;
    # a resume at step 1 keeps rows 0 and 1.
    MetricsLogger(tmp_path, enabled=True, resume_step=1).close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    MetricsLogger(tmp_path, enabled=True, resume_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
