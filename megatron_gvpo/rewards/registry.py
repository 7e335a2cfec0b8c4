"""Reward registry: names -> reward functions, and binding a ``RewardConfig`` to a callable."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from megatron_gvpo.rewards.base import RewardConfig
from megatron_gvpo.rewards.user import is_spec, load_callable


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: the function (or factory), and how it is called."""

    fn: Callable
    batched: bool = False  # fn takes a list of inputs and returns a list of scores
    factory: bool = False  # fn(**kwargs) builds the scorer once, at construction


_REGISTRY: dict[str, RewardEntry] = {}


def register_reward(
    name: str, *, batched: bool = False, factory: bool = False, override: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator registering a reward under ``name``; re-registering a name needs ``override``."""
    if not name or is_spec(name):
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':'")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn and not override:
            raise ValueError(f"reward {name!r} is already registered ({_REGISTRY[name].fn!r})")
        _REGISTRY[name] = RewardEntry(fn=fn, batched=batched, factory=factory)
        return fn

    return deco


def unregister_reward(name: str) -> None:
    """Remove ``name`` from the registry (tests, notebooks); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def registered_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def _check_kwargs(fn: Callable, kwargs: dict, positional: int, key: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; let the call decide
        return
    try:
        sig.bind(*([None] * positional), **kwargs)
    except TypeError as e:
        raise ValueError(f"reward '{key}': 'kwargs' {sorted(kwargs)} do not fit {fn!r}: {e}") from e


def reward_entry(cfg: RewardConfig, where: str | None = None) -> RewardEntry:
    """The function ``cfg.name`` names: a ``module:function`` spec (imported, not called) or a
    registered reward. Raises ValueError for a name that resolves to nothing (naming ``where``,
    the setting, when given) and for a ``batched`` the registered reward fixes otherwise."""
    if is_spec(cfg.name):
        fn = load_callable(cfg.name, what=where or "reward spec")
        return RewardEntry(fn=fn, batched=bool(cfg.batched))
    if cfg.name not in _REGISTRY:
        setting = where or "reward config 'name'"
        raise ValueError(
            f"{setting}: unknown reward {cfg.name!r}; registered: "
            f"{registered_rewards()}, or give a 'module:function' spec"
        )
    entry = _REGISTRY[cfg.name]
    if cfg.batched is not None and cfg.batched != entry.batched:
        raise ValueError(
            f"reward '{cfg.key}': 'batched' is fixed by the registered reward "
            f"({entry.batched}); leave it unset"
        )
    return entry


def bind_reward(cfg: RewardConfig) -> tuple[Callable, bool]:
    """Resolve ``cfg.name``, bind ``cfg.kwargs``; returns (scorer, batched). Bad configs raise."""
    entry = reward_entry(cfg)
    if entry.factory:
        _check_kwargs(entry.fn, cfg.kwargs, 0, cfg.key)
        try:
            scorer = entry.fn(**cfg.kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"reward '{cfg.key}': {e}") from e
        return scorer, entry.batched
    _check_kwargs(entry.fn, cfg.kwargs, 1, cfg.key)
    scorer = functools.partial(entry.fn, **cfg.kwargs) if cfg.kwargs else entry.fn
    return scorer, entry.batched
