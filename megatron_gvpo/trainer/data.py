"""The run's prompts: ``data.*`` -> a tokenised dataset and a resumable sampler.

``data.builtin=toy_addition`` (the demo) writes the built-in task as JSONL into the run directory
and then reads it like any user file, so the demo exercises the same loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_gvpo.data.preference import PreferenceDataConfig
from megatron_gvpo.data.prompts import Prompt, load_prompts, resolve_files
from megatron_gvpo.data.sampler import PromptSampler
from megatron_gvpo.data.tokenizer import hf_dir, load_tokenizer
from megatron_gvpo.demo.task import generate_toy_dataset, write_jsonl

BUILTINS = ("toy_addition", "preference_demo")


@dataclass
class DataSection(PreferenceDataConfig):
    """``data.*``: the prompt and pair loaders' fields plus the built-in task switch."""

    builtin: str | None = None  # toy_addition or preference_demo: generated (data.path ignored)
    builtin_size: int = 2000  # rows of the built-in task

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.builtin is not None and self.builtin not in BUILTINS:
            raise ValueError(f"data.builtin={self.builtin!r} is not one of {', '.join(BUILTINS)}")

    def check_files(self) -> None:
        """A missing data file fails here, before any model is built."""
        if self.builtin is None:
            resolve_files(self.path)
            if self.eval_path is not None:
                resolve_files(self.eval_path, "data.eval_path")


def prompt_room(
    model_path: str | Path, max_new_tokens: int, max_tokens_per_microbatch: int
) -> tuple[int, str]:
    """The most prompt tokens that leave room for a ``max_new_tokens`` response both in the
    model's context (``max_position_embeddings`` of its config.json) and in one packed
    micro-batch, and what sets that bound (for the message that counts dropped prompts)."""
    cfg_file = hf_dir(model_path) / "config.json"
    context = int(json.loads(cfg_file.read_text()).get("max_position_embeddings", 4096))
    by_context = (context - max_new_tokens, f"max_position_embeddings={context} in {cfg_file}")
    by_budget = (
        max_tokens_per_microbatch - max_new_tokens,
        f"trainer.max_tokens_per_microbatch={max_tokens_per_microbatch}",
    )
    limit, what = min(by_context, by_budget)
    return limit, f"{what} minus rollout.max_new_tokens={max_new_tokens}"


class PromptSource:
    """Tokenised prompts and the sampler that deals them out, ``prompts_per_step`` at a time."""

    def __init__(
        self,
        cfg: DataSection,
        model_path: str,
        run_dir: Path,
        batch_size: int,
        trust_remote_code: bool = False,
        room: tuple[int, str] | None = None,
    ):
        """``room``: see :func:`prompt_room` (prompts that leave no room are dropped, counted)."""
        if cfg.builtin == "toy_addition":
            path = run_dir / "data" / "toy_addition.jsonl"
            if not path.is_file():
                write_jsonl(generate_toy_dataset(cfg.builtin_size, seed=cfg.seed), path)
            cfg = DataSection(**{**cfg.__dict__, "path": str(path), "builtin": None})
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.dataset = load_prompts(cfg, self.tokenizer, room)
        self.sampler = PromptSampler(len(self.dataset), batch_size, cfg.shuffle, cfg.seed)
        self.domains = self.dataset.domains() or ["default"]

    def next_batch(self) -> list[Prompt]:
        return [self.dataset[i] for i in self.sampler.next_batch()]

    def domain_index(self, domain: str | None) -> int:
        return self.domains.index(domain) if domain in self.domains else 0

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
