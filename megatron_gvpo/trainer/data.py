"""The run's prompts: ``data.*`` -> a tokenised dataset, a resumable sampler, the eval sets.

``data.builtin=toy_addition`` (the demo) writes the built-in task as JSONL into the run directory
(``data/toy_addition.jsonl``: training-split pairs; ``data/eval.jsonl``: distinct held-out pairs,
the eval set unless ``data.eval_path`` names another) and then reads them like any user file, so
the demo exercises the same loader.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from megatron_gvpo.data.preference import PreferenceDataConfig
from megatron_gvpo.data.prompts import (
    DataConfig,
    Prompt,
    PromptDataset,
    load_prompts,
    resolve_files,
)
from megatron_gvpo.data.sampler import SAMPLINGS, build_sampler
from megatron_gvpo.data.tokenizer import hf_dir, load_tokenizer
from megatron_gvpo.demo.task import generate_toy_dataset, is_heldout, toy_prompt, write_jsonl

BUILTINS = ("toy_addition", "preference_demo")


@dataclass
class DataSection(DataConfig):
    """``data.*`` of RL runs (the Hydra schema ``data_schema``): the prompt loader's fields, the
    eval sets, how rows are drawn into steps and the built-in task switch."""

    group_key: Any = None
    """Renamed ``data.domain_key`` (the row's domain label); setting it is an error."""
    eval_path: Any = None
    """Held-out rows in data.path's format (pairs for preference training, prompts for RL),
    evaluated as trainer.eval_interval and trainer.eval_at_start say; None: none."""
    sampling: str = "auto"
    """How training rows are drawn into steps. uniform: shuffled epochs over the rows, each once
    per epoch; proportional: the Group-Robust paper's draw, a domain d with probability N_d/N,
    then a row of d uniformly, with replacement; balanced: every step holds equal numbers of
    rows of each domain (as equal as the batch size allows), each domain's rows in shuffled
    epochs of their own; auto: balanced for group-robust objectives with
    ``algorithm.robust_estimator=balanced``, else uniform."""
    builtin: str | None = None  # toy_addition or preference_demo: generated (data.path ignored)
    builtin_size: int = 2000  # rows of the built-in task
    builtin_eval_size: int = 500
    """Distinct held-out pairs in the built-in task's eval set (``<run_dir>/data/eval.jsonl``);
    0: no built-in eval set."""
    eval_sets: dict[str, Any] = field(default_factory=dict)
    """Named eval sets ``{name: path}`` (same row schema as data.path), reported under
    ``eval/<name>/``; ``data.eval_path`` is the unnamed one, reported under ``eval/``."""

    def __post_init__(self) -> None:
        if self.group_key is not None:
            raise ValueError(
                f"data.group_key={self.group_key!r} was renamed data.domain_key "
                "(the label group-robust weights are kept over)"
            )
        if self.sampling == "group":
            raise ValueError("data.sampling=group was renamed data.sampling=proportional")
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"data.sampling={self.sampling!r} is not one of {', '.join(SAMPLINGS)}"
            )
        if self.builtin is not None and self.builtin not in BUILTINS:
            raise ValueError(f"data.builtin={self.builtin!r} is not one of {', '.join(BUILTINS)}")
        for name in self.eval_sets or {}:
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"data.eval_sets: {name!r} is not a valid set name (no '/')")
        if self.builtin_eval_size < 0:
            raise ValueError(f"data.builtin_eval_size must be >= 0, got {self.builtin_eval_size}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")

    def check(self) -> None:
        """A missing data file fails here, before any model is built."""
        if self.builtin is None:
            resolve_files(self.path)
        if self.eval_path is not None and self.builtin != "preference_demo":
            resolve_files(self.eval_path, "data.eval_path")
        for name, (path, key) in eval_set_paths(self).items():
            if name:
                resolve_files(path, key)

    def has_eval(self) -> bool:
        """Whether the run has an eval set (the built-in tasks bring their own)."""
        builtin = self.builtin == "preference_demo" or (
            self.builtin == "toy_addition" and self.builtin_eval_size > 0
        )
        return builtin or self.eval_path is not None or bool(self.eval_sets)


@dataclass
class PreferenceDataSection(DataSection, PreferenceDataConfig):
    """``data.*`` of preference runs (the Hydra schema ``preference_data_schema``): the RL
    section's fields plus where a pair keeps its two responses (``data.chosen_key``,
    ``data.rejected_key``), which RL runs do not accept."""


def preference_only_fields() -> set[str]:
    """``data.*`` keys that only preference runs have."""
    names = {f.name for f in fields(PreferenceDataSection)}
    return names - {f.name for f in fields(DataSection)}


def toy_eval_rows(n: int, seed: int) -> list[dict]:
    """``n`` distinct held-out addition pairs (or all of them, if fewer), drawn with ``seed``."""
    pairs = [(a, b) for a in range(100) for b in range(100) if is_heldout(a, b)]
    random.Random(seed).shuffle(pairs)
    return [
        {
            "prompt": toy_prompt(a, b),
            "answer": a + b,
            "domain": "carry" if a % 10 + b % 10 >= 10 else "nocarry",
        }
        for a, b in pairs[:n]
    ]


def eval_set_paths(cfg: DataSection) -> dict[str, tuple[Any, str]]:
    """Each eval set's name ("" for ``data.eval_path``), path and config key."""
    named: dict[str, tuple[Any, str]] = {}
    if cfg.eval_path is not None:
        named[""] = (cfg.eval_path, "data.eval_path")
    for name, spec in (cfg.eval_sets or {}).items():
        path = spec.get("path") if isinstance(spec, Mapping) else spec
        named[name] = (path, f"data.eval_sets.{name}")
    return named


def load_eval_sets(cfg: DataSection, tokenizer) -> dict[str, PromptDataset]:
    """``data.eval_path`` (named "") and ``data.eval_sets``, read and tokenised like the training
    prompts; empty when none is configured."""
    return {
        name: load_prompts(replace(cfg, path=path), tokenizer, key)
        for name, (path, key) in eval_set_paths(cfg).items()
    }


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
                rows = generate_toy_dataset(cfg.builtin_size, seed=cfg.seed, split="train")
                write_jsonl(rows, path)
            evals, eval_path = run_dir / "data" / "eval.jsonl", cfg.eval_path
            if eval_path is None and cfg.builtin_eval_size:
                if not evals.is_file():
                    write_jsonl(toy_eval_rows(cfg.builtin_eval_size, cfg.seed), evals)
                eval_path = str(evals)
            cfg = replace(cfg, path=str(path), builtin=None, eval_path=eval_path)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.dataset = load_prompts(cfg, self.tokenizer, room=room)
        self.eval_sets = load_eval_sets(cfg, self.tokenizer)
        self.domains = self.dataset.domains() or ["default"]
        self.cfg, self.batch_size = cfg, batch_size
        self.make_sampler(None)

    def domain_counts(self) -> list[int]:
        """Prompts per domain, in ``domains`` order."""
        rows = self.row_domains()
        return [rows.count(k) for k in range(len(self.domains))]

    def row_domains(self) -> list[int]:
        return [self.domain_index(self.dataset[i].domain) for i in range(len(self.dataset))]

    def make_sampler(self, allocation: Callable[[int], list[int]] | None) -> None:
        """The ``data.sampling`` sampler; ``allocation``: the objective's rows per domain of a
        step (``Objective.domain_allocation``), which ``auto`` follows."""
        c = self.cfg
        rows = self.row_domains()
        self.sampler = build_sampler(c.sampling, rows, self.batch_size, c.shuffle, c.seed, allocation)

    def next_batch(self) -> list[Prompt]:
        return [self.dataset[i] for i in self.sampler.next_batch()]

    def domain_index(self, domain: str | None) -> int:
        return self.domains.index(domain) if domain in self.domains else 0

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
