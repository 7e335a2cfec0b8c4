"""``tools/compare_algorithms.py``: the held-out prompts it scores greedy accuracy on are never
trained on, neither by the warm start nor by any compared run.

Reference: the prompt files the trainer itself writes for the demo task
(``trainer/data.py`` ``PromptSource``, the same generator and ``data.*`` defaults), and the
demo task's held-out rule recomputed here from its definition ((a * 100 + b) % 5 == 0).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from conftest import TOOLS

from megatron_gvpo.demo.task import save_char_tokenizer
from megatron_gvpo.trainer.data import DataSection, PromptSource


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOLS / "compare_algorithms.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare_algorithms"] = mod
    spec.loader.exec_module(mod)
    return mod


ca = _load_tool()


def _written_prompts(tmp_path: Path, seed: int, tokenizer_dir: Path) -> set[str]:
    """The RL prompts the trainer writes for a demo run with ``data.seed=seed``."""
    cfg = DataSection(builtin="toy_addition", seed=seed, max_prompt_length=64)
    run_dir = tmp_path / f"run{seed}"
    PromptSource(cfg, str(tokenizer_dir), run_dir, batch_size=4)
    lines = (run_dir / "data" / "toy_addition.jsonl").read_text().splitlines()
    return {json.loads(x)["prompt"] for x in lines if x}


def test_heldout_rows_disjoint_from_every_run_and_the_warm_start(tmp_path):
    save_char_tokenizer(tmp_path / "tok")
    seeds = [0, 3]
    rows = ca.heldout_rows(seeds)
    prompts = {r["prompt"] for r in rows}
    assert len(prompts) == len(rows) > 500  # enough to score on, no duplicates
    for seed in seeds:
        assert not prompts & _written_prompts(tmp_path, seed, tmp_path / "tok")
    for r in rows:  # warm-start training never saw these pairs; answers are the sums
        a, b = int(r["prompt"][:2]), int(r["prompt"][3:5])
        assert r["prompt"] == f"{a:02d}+{b:02d}=" and (a * 100 + b) % 5 == 0
        assert r["answer"] == str(a + b)
