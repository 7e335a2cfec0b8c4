"""Prompt datasets from JSONL or parquet files, validated and tokenised before any model is built.

A row holds ``prompt`` (a string, or a list of chat messages as in verl's parquet files) or
``messages`` (a list of ``{role, content}``), optionally ``answer`` (else ``label``) and ``domain``;
every other field is kept as metadata. Chat messages go through the tokenizer's chat template;
plain prompts do too with ``apply_chat_template``. Prompts longer than ``max_prompt_length`` tokens
are dropped and counted (as verl's ``filter_overlong_prompts`` does), never truncated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet")
_TOKENIZE_CHUNK = 1024


class DataError(ValueError):
    """A data file or row the loader cannot use; the message names the config field or row."""


@dataclass
class DataConfig:
    """What ``data.*`` in the Hydra config maps onto."""

    path: Any = ""  # .jsonl / .parquet files, or folders of them: a str or a list of str
    prompt_key: str = "prompt"
    messages_key: str = "messages"
    answer_key: str = "answer"  # dotted for nested fields, e.g. "reward_model.ground_truth"
    label_key: str = "label"  # read when the answer key is absent
    domain_key: str = "domain"
    max_prompt_length: int = 1024  # tokens, chat template included; longer prompts are dropped
    apply_chat_template: bool = False  # also template plain prompts (as one user message)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of failing
    shuffle: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt; ``source`` names its file and line (JSONL) or row (parquet)."""

    prompt_ids: list[int]
    text: str  # what prompt_ids encode (template applied)
    answer: str | None
    domain: str | None
    metadata: dict[str, Any]
    source: str


@dataclass
class LoadStats:
    """Counts from one load: rows read, kept, skipped as malformed, dropped as too long."""

    rows: int = 0
    kept: int = 0
    bad: int = 0
    too_long: int = 0
    no_room: int = 0  # prompts that leave no room for a full-length response (``room``)
    bad_examples: list[str] = field(default_factory=list)  # the first few reasons


class PromptDataset(Sequence[Prompt]):
    """The kept prompts, in file order, and the load's counts."""

    def __init__(self, prompts: list[Prompt], stats: LoadStats):
        self.prompts, self.stats = prompts, stats

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):  # type: ignore[override]
        return self.prompts[i]

    def domains(self) -> list[str]:
        """The distinct domains present, sorted (empty when no row has one)."""
        return sorted({p.domain for p in self.prompts if p.domain is not None})


@dataclass
class PromptRow:
    """One validated row before tokenisation: a plain prompt or chat messages."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    answer: str | None
    domain: str | None
    metadata: dict[str, Any]
    source: str


class _BadRow(Exception):
    pass


def resolve_files(path: str | list[str] | tuple[str, ...], key: str = "data.path") -> list[Path]:
    """The data files ``path`` names (files, or folders whose .jsonl/.parquet files are read
    in sorted order); a missing path is an error naming the config ``key``."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or any(not str(p) for p in paths):
        raise DataError(f"{key} is not set: give a .jsonl or .parquet file (or a folder)")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{key}: folder {str(p)!r} holds no .jsonl or .parquet file")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DataError(f"{key}: {str(p)!r} is neither .jsonl nor .parquet")
            files.append(p)
        else:
            raise DataError(f"{key}: no such file or folder: {str(p)!r}")
    return files


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed row or the ``_BadRow`` saying why not); lines are decoded one by
    one, so invalid UTF-8 is a bad row naming its line like invalid JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _BadRow(f"invalid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _BadRow(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"data.path: cannot read parquet file {str(path)!r}: {e}") from e
    index = 0
    for batch in reader.iter_batches(batch_size=_TOKENIZE_CHUNK):
        for row in batch.to_pylist():
            yield f"{path} row {index}", row
            index += 1


def _lookup(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, following dots into nested dicts; None when absent."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _messages(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _BadRow(f"{key!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _BadRow(f"{key!r}[{i}] must be an object, got {type(m).__name__}")
        for part in ("role", "content"):
            if not isinstance(m.get(part), str):
                got = type(m.get(part)).__name__
                raise _BadRow(f"{key!r}[{i}].{part} must be a string, got {got}")
    return value


def _scalar_text(value: Any, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise _BadRow(f"{key!r} must be a string or a number, got {type(value).__name__}")


def _parse_row(row: Any, cfg: DataConfig, source: str) -> PromptRow:
    """Validate one raw row into prompt or messages, answer, domain and metadata."""
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    prompt, messages = row.get(cfg.prompt_key), None
    if prompt is None:
        if row.get(cfg.messages_key) is None:
            raise _BadRow(f"has neither {cfg.prompt_key!r} nor {cfg.messages_key!r}")
        messages = _messages(row[cfg.messages_key], cfg.messages_key)
    elif isinstance(prompt, list):
        prompt, messages = None, _messages(prompt, cfg.prompt_key)
    elif not isinstance(prompt, str):
        got = type(prompt).__name__
        raise _BadRow(f"{cfg.prompt_key!r} must be a string or a list of messages, got {got}")
    elif not prompt:
        raise _BadRow(f"{cfg.prompt_key!r} is empty")
    answer = _lookup(row, cfg.answer_key)
    answer_key = cfg.answer_key if answer is not None else cfg.label_key
    answer = _scalar_text(answer if answer is not None else row.get(cfg.label_key), answer_key)
    domain = _scalar_text(row.get(cfg.domain_key), cfg.domain_key)
    used = {cfg.prompt_key, cfg.messages_key, cfg.answer_key, cfg.label_key, cfg.domain_key}
    metadata = {k: v for k, v in row.items() if k not in used}
    return PromptRow(prompt, messages, answer, domain, metadata, source)


def _skip_bad_row(cfg: DataConfig, stats: LoadStats, source: str, e: Exception) -> None:
    """Fail naming the row, or (``data.skip_bad_rows``) count it and keep the first reasons."""
    if not cfg.skip_bad_rows:
        raise DataError(f"{source}: {e} (set data.skip_bad_rows to skip)") from None
    stats.bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{source}: {e}")


def read_rows(cfg: DataConfig, key: str = "data.path") -> tuple[list[PromptRow], LoadStats]:
    """Read and validate every row (no tokenizer needed): fails on the first malformed row,
    naming its file and line (JSONL, 1-based) or row (parquet, 0-based), unless skipped.
    ``key`` names the config field that gave ``cfg.path`` in errors."""
    stats, rows = LoadStats(), []
    for path in resolve_files(cfg.path, key):
        reader = _iter_parquet if path.suffix == ".parquet" else _iter_jsonl
        for source, raw in reader(path):
            stats.rows += 1
            try:
                rows.append(_parse_row(raw, cfg, source))
            except _BadRow as e:
                _skip_bad_row(cfg, stats, source, e)
    return rows, stats


def _render(row: PromptRow, tokenizer, cfg: DataConfig) -> str:
    """The prompt text: the chat template with a generation prompt, or the plain prompt."""
    if row.messages is None and not cfg.apply_chat_template:
        return row.prompt  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        why = "a row has chat messages" if row.messages else "data.apply_chat_template is true"
        raise DataError(f"{why} but the tokenizer has no chat template ({row.source})")
    messages = row.messages or [{"role": "user", "content": row.prompt}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may raise on a conversation it rejects
        raise _BadRow(f"chat template failed: {e}") from e


def _encode(texts: list[str], templated: list[bool], tokenizer) -> list[list[int]]:
    """Token ids; templated text carries its own special tokens, plain text gets the default."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, t in enumerate(templated) if t == flag]
        for s in range(0, len(idx), _TOKENIZE_CHUNK):
            chunk = idx[s : s + _TOKENIZE_CHUNK]
            enc = tokenizer([texts[i] for i in chunk], add_special_tokens=not flag)
            for i, ids in zip(chunk, enc["input_ids"], strict=True):
                out[i] = list(ids)
    return out


def load_prompts(
    cfg: DataConfig,
    tokenizer,
    key: str = "data.path",
    room: tuple[int, str] | None = None,
) -> PromptDataset:
    """Read, validate and tokenise ``cfg.path``; drop (and count) prompts over the length limit.
    ``key`` names the config field that gave ``cfg.path`` (an eval set's, for example).

    ``room``: (the most prompt tokens that leave room for a full-length response, what sets that
    bound); longer prompts are dropped and counted too (a response would run past the model's
    context or the micro-batch budget).
    """
    if cfg.max_prompt_length < 1:
        raise DataError(f"data.max_prompt_length must be >= 1, got {cfg.max_prompt_length}")
    rows, stats = read_rows(cfg, key)
    texts, flags, kept_rows = [], [], []
    for row in rows:
        try:
            texts.append(_render(row, tokenizer, cfg))
        except _BadRow as e:
            _skip_bad_row(cfg, stats, row.source, e)
            continue
        flags.append(row.messages is not None or cfg.apply_chat_template)
        kept_rows.append(row)
    prompts = []
    for row, text, ids in zip(kept_rows, texts, _encode(texts, flags, tokenizer), strict=True):
        if len(ids) > cfg.max_prompt_length:
            stats.too_long += 1
            continue
        if room is not None and len(ids) > room[0]:
            stats.no_room += 1
            continue
        prompts.append(Prompt(ids, text, row.answer, row.domain, row.metadata, row.source))
    stats.kept = len(prompts)
    _report(cfg, stats, key, room)
    return PromptDataset(prompts, stats)


def _report(
    cfg: DataConfig, stats: LoadStats, key: str, room: tuple[int, str] | None = None
) -> None:
    if stats.bad:
        logger.warning(
            "%s: skipped %d malformed row(s) of %d; first: %s",
            key,
            stats.bad,
            stats.rows,
            "; ".join(stats.bad_examples),
        )
    if stats.too_long:
        logger.warning(
            "%s: dropped %d prompt(s) longer than data.max_prompt_length=%d tokens "
            "(filtered, not truncated, as verl's filter_overlong_prompts does)",
            key,
            stats.too_long,
            cfg.max_prompt_length,
        )
    no_room = ""
    if room is not None:
        no_room = f"longer than {room[0]} tokens, which leave no room for a response ({room[1]})"
    if stats.no_room:
        logger.warning("%s: dropped %d prompt(s) %s", key, stats.no_room, no_room)
    if not stats.kept:
        raise DataError(
            f"{key}: no prompts left ({stats.rows} rows read, {stats.bad} malformed, "
            f"{stats.too_long} over data.max_prompt_length={cfg.max_prompt_length}"
            + (f", {stats.no_room} {no_room}" if stats.no_room else "")
            + ")"
        )
