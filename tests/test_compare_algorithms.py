"""The demo's held-out evaluation is never trained on: not by the warm start, not by any RL run,
not in ``tools/compare_algorithms.py``; and the tool picks each arm's best learning rate.

Reference: the prompt files the trainer itself writes for the demo task (``trainer/data.py``
``PromptSource``, the same generator and ``data.*`` defaults), the warm-start rows
(``demo/model.py`` ``teacher_rows``), and the held-out rule recomputed here from its definition.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from conftest import TOOLS

from megatron_gvpo.demo.model import teacher_rows
from megatron_gvpo.demo.task import save_char_tokenizer
from megatron_gvpo.trainer.data import DataSection, PromptSource


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOLS / "compare_algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_algorithms"] = mod
    spec.loader.exec_module(mod)
    return mod


ca = _load_tool()


def _heldout(a: int, b: int) -> bool:
    return ((a * 100 + b) * 2654435761) % (1 << 32) % 5 == 0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_eval_sets_are_disjoint_from_every_training_prompt(tmp_path):
    save_char_tokenizer(tmp_path / "tok")
    greedy, sampled = ca.eval_files(tmp_path / "compare")
    tool_rows = _jsonl(greedy)
    assert len({r["prompt"] for r in tool_rows}) == len(tool_rows) == ca.EVAL_PROMPTS
    assert _jsonl(sampled) == tool_rows[: ca.SAMPLED_PROMPTS]
    warm = {r["prompt"] for r in teacher_rows(64_000, seed=0, worked_share=0.3)}
    for seed in (0, 3):
        cfg = DataSection(builtin="toy_addition", seed=seed, max_prompt_length=64)
        run_dir = tmp_path / f"run{seed}"
        source = PromptSource(cfg, str(tmp_path / "tok"), run_dir, batch_size=4)
        trained = {r["prompt"] for r in _jsonl(run_dir / "data" / "toy_addition.jsonl")}
        run_eval = _jsonl(run_dir / "data" / "eval.jsonl")
        assert len(source.eval_sets[""]) == len(run_eval) == cfg.builtin_eval_size
        for rows in (run_eval, tool_rows):
            prompts = {r["prompt"] for r in rows}
            assert not prompts & trained and not prompts & warm
            for r in rows:  # held-out pairs, integer answers
                a, b = int(r["prompt"][:2]), int(r["prompt"][3:5])
                assert r["prompt"] == f"{a:02d}+{b:02d}=" and _heldout(a, b)
                assert r["answer"] == a + b
        assert all(not _heldout(int(p[:2]), int(p[3:5])) for p in trained | warm)


def test_best_learning_rate_per_arm_and_table():
    def run(arm, lr, seed, end):
        evals = {s: {"greedy_acc": g, "pass@1": g, "pass@8": g} for s, g in ((0, 0.4), (5, end), (10, end))}
        return {"arm": arm, "lr": lr, "seed": seed, "eval": evals, "last10_reward": end,
                "step_s": 0.1}  # fmt: skip

    results = [run("gvpo", 1e-4, s, 0.9) for s in (0, 1)] + [run("gvpo", 1e-3, s, 0.5) for s in (0, 1)]
    results += [run("grpo", 1e-4, 0, 0.7), run("grpo", 1e-3, 0, 0.7)]
    assert ca.best_lrs(results, 10) == {"gvpo": 1e-4, "grpo": 1e-4}  # a tie keeps the smaller
    text = ca.table(results, 10, 8)
    assert "| gvpo | 0.0001 | 2 | 0.400 ± 0.000 (0.400..0.400) | 0.900 ± 0.000" in text
