"""Preference pairs from JSONL or parquet files, validated and tokenised before any model is built.

A row holds a prompt (``prompt``: a string or a list of chat messages; or ``messages``), a
``chosen`` and a ``rejected`` response (each a string, or a list of chat turns as in TRL's DPO
datasets), and optionally a domain label (``data.domain_key``, the label Group-Robust PO keeps
its weights over). Errors name the file, the line (JSONL, 1-based) or row (parquet, 0-based) and
the field. The domains and their sizes N_d (and N) are counted once over the whole file.

Tokens: a plain prompt is tokenised with the tokenizer's special tokens (BOS) and a plain
response gets EOS appended (as TRL does). A conversation is rendered by the chat template; the
response is what the template adds after the prompt's generation prefix, so it carries the
template's end-of-turn tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_gvpo.data.prompts import (
    DataConfig,
    DataError,
    LoadStats,
    _BadRow,
    _iter_jsonl,
    _iter_parquet,
    _messages,
    _scalar_text,
    _skip_bad_row,
    resolve_files,
)

logger = logging.getLogger(__name__)

DEFAULT_DOMAIN = "default"


@dataclass
class PreferenceDataConfig(DataConfig):
    """The pair loader's fields, beside the prompt loader's: where a row keeps its two responses."""

    chosen_key: str = "chosen"
    """The preferred response: text, or a list of chat turns."""
    rejected_key: str = "rejected"
    """The dispreferred response: text, or a list of chat turns."""


@dataclass(frozen=True)
class Pair:
    """One tokenised preference pair; ``source`` names its file and line (or parquet row)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    domain: str
    source: str


@dataclass
class PairDataset:
    """The kept pairs in file order, their domains (sorted names) and domain sizes."""

    pairs: list[Pair]
    stats: LoadStats
    domains: list[str] = field(default_factory=list)
    domain_counts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]

    def domain_index(self) -> list[int]:
        """Each pair's index into ``domains``."""
        index = {g: k for k, g in enumerate(self.domains)}
        return [index[p.domain] for p in self.pairs]


@dataclass
class _PairRow:
    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    rejected: str | list[dict[str, Any]]
    domain: str | None
    source: str


def _response(value: Any, key: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        if not value:
            raise _BadRow(f"{key!r} is empty")
        return value
    if isinstance(value, list):
        return _messages(value, key)
    if value is None:
        raise _BadRow(f"has no {key!r}")
    raise _BadRow(f"{key!r} must be a string or a list of chat turns, got {type(value).__name__}")


def _parse_pair(row: Any, cfg: PreferenceDataConfig, source: str) -> _PairRow:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    prompt = row.get(cfg.prompt_key)
    if prompt is None:
        if row.get(cfg.messages_key) is None:
            raise _BadRow(f"has neither {cfg.prompt_key!r} nor {cfg.messages_key!r}")
        prompt = _messages(row[cfg.messages_key], cfg.messages_key)
    elif isinstance(prompt, list):
        prompt = _messages(prompt, cfg.prompt_key)
    elif not isinstance(prompt, str):
        got = type(prompt).__name__
        raise _BadRow(f"{cfg.prompt_key!r} must be a string or a list of messages, got {got}")
    elif not prompt:
        raise _BadRow(f"{cfg.prompt_key!r} is empty")
    chosen = _response(row.get(cfg.chosen_key), cfg.chosen_key)
    rejected = _response(row.get(cfg.rejected_key), cfg.rejected_key)
    domain = _scalar_text(row.get(cfg.domain_key), cfg.domain_key)
    if domain == "":
        raise _BadRow(f"{cfg.domain_key!r} is empty")
    return _PairRow(prompt, chosen, rejected, domain, source)


def read_pair_rows(
    cfg: PreferenceDataConfig, path: Any, key: str = "data.path"
) -> tuple[list[_PairRow], LoadStats]:
    """Read and validate every row of ``path`` (no tokenizer needed); the first malformed row
    fails, naming its file, line and field (or is counted with ``data.skip_bad_rows``)."""
    stats, rows = LoadStats(), []
    for file in resolve_files(path, key):
        reader = _iter_parquet if file.suffix == ".parquet" else _iter_jsonl
        for source, raw in reader(file):
            stats.rows += 1
            try:
                rows.append(_parse_pair(raw, cfg, source))
            except _BadRow as e:
                _skip_bad_row(cfg, stats, source, e)
    labelled = [r for r in rows if r.domain is not None]
    if labelled and len(labelled) != len(rows):
        missing = next(r for r in rows if r.domain is None)
        raise DataError(
            f"{missing.source}: has no {cfg.domain_key!r} but other rows have one "
            f"(every pair needs a domain label, data.domain_key={cfg.domain_key!r})"
        )
    return rows, stats


def _as_turns(value: str | list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _tokenize(row: _PairRow, cfg: PreferenceDataConfig, tokenizer) -> tuple[list[int], ...]:
    chat = cfg.apply_chat_template or any(
        isinstance(v, list) for v in (row.prompt, row.chosen, row.rejected)
    )
    if not chat:
        prompt = tokenizer(row.prompt)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out = [prompt]
        for value in (row.chosen, row.rejected):
            out.append(tokenizer(value, add_special_tokens=False)["input_ids"] + eos)
        return tuple(out)
    if not getattr(tokenizer, "chat_template", None):
        raise _BadRow("a pair is a conversation but the tokenizer has no chat template")
    messages = _as_turns(row.prompt, "user")
    try:
        prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = [tokenizer(prefix, add_special_tokens=False)["input_ids"]]
        for key, value in ((cfg.chosen_key, row.chosen), (cfg.rejected_key, row.rejected)):
            full = tokenizer.apply_chat_template(
                messages + _as_turns(value, "assistant"), tokenize=False
            )
            if not full.startswith(prefix):
                raise _BadRow(
                    f"{key!r}: the chat template does not render the prompt as a prefix of "
                    "the conversation"
                )
            out.append(tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"])
    except _BadRow:
        raise
    except Exception as e:  # a template may raise on a conversation it rejects
        raise _BadRow(f"chat template failed: {e}") from e
    return tuple(out)


def load_pairs(
    cfg: PreferenceDataConfig, tokenizer, path: Any = None, key: str = "data.path"
) -> PairDataset:
    """Read, validate and tokenise the pairs of ``path`` (default ``cfg.path``); pairs whose prompt
    exceeds ``data.max_prompt_length`` tokens are dropped and counted."""
    rows, stats = read_pair_rows(cfg, cfg.path if path is None else path, key)
    pairs, identical = [], []
    for row in rows:
        try:
            prompt, chosen, rejected = _tokenize(row, cfg, tokenizer)
            for name, ids in ((cfg.chosen_key, chosen), (cfg.rejected_key, rejected)):
                if not ids:
                    raise _BadRow(f"{name!r} has no tokens")
        except _BadRow as e:
            _skip_bad_row(cfg, stats, row.source, e)
            continue
        if len(prompt) > cfg.max_prompt_length:
            stats.too_long += 1
            continue
        if chosen == rejected:
            identical.append(row.source)
        pairs.append(Pair(prompt, chosen, rejected, row.domain or DEFAULT_DOMAIN, row.source))
    stats.kept = len(pairs)
    if identical:  # h = 0 whatever the weights: such a pair trains at zero gradient
        logger.warning(
            "%s: %d pair(s) whose %r and %r are the same tokens (they carry no preference and "
            "train at zero gradient); first: %s",
            key,
            len(identical),
            cfg.chosen_key,
            cfg.rejected_key,
            identical[0],
        )
    if stats.bad or stats.too_long:
        logger.warning(
            "%s: %d malformed pair(s) skipped, %d over data.max_prompt_length=%d dropped; first: %s",
            key,
            stats.bad,
            stats.too_long,
            cfg.max_prompt_length,
            "; ".join(stats.bad_examples),
        )
    if not pairs:
        raise DataError(f"{key}: no pairs left ({stats.rows} rows read, {stats.bad} malformed)")
    counts = Counter(p.domain for p in pairs)
    domains = sorted(counts)
    return PairDataset(pairs, stats, domains, [counts[d] for d in domains])
