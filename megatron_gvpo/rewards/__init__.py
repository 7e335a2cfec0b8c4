"""Reward registry: math (math-verify), format, remote HTTP reward model, user ``module:function``.

Typical use::

    rewards = RewardManager([RewardConfig("math"), RewardConfig("format", weight=0.1)])
    result = rewards([RewardInput(prompt, response, label=answer), ...])
    result.scores, result.metrics()

A failing or hung reward scores 0 for its samples and is counted; it never stops the run.
"""

from megatron_gvpo.rewards.base import RewardConfig, RewardInput, RewardStats
from megatron_gvpo.rewards.format import THINK_ANSWER, FormatReward
from megatron_gvpo.rewards.guard import RewardTimeout, call_guarded
from megatron_gvpo.rewards.manager import (
    Reward,
    RewardManager,
    RewardResult,
    check_reward_configs,
)
from megatron_gvpo.rewards.math import MathReward, last_boxed, last_number
from megatron_gvpo.rewards.registry import (
    bind_reward,
    register_reward,
    registered_rewards,
    unregister_reward,
)
from megatron_gvpo.rewards.remote import RemoteReward
from megatron_gvpo.rewards.user import load_callable

__all__ = [
    "THINK_ANSWER",
    "FormatReward",
    "MathReward",
    "RemoteReward",
    "Reward",
    "RewardConfig",
    "RewardInput",
    "RewardManager",
    "RewardResult",
    "RewardStats",
    "RewardTimeout",
    "bind_reward",
    "call_guarded",
    "check_reward_configs",
    "last_boxed",
    "last_number",
    "load_callable",
    "register_reward",
    "registered_rewards",
    "unregister_reward",
]
