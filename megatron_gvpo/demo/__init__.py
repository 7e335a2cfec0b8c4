"""The embedded demo: two-digit addition (``task``), its exact reward (registered as
``toy_addition``), the warm-started tiny model (``model``), and the built-in dataset.

``python -m megatron_gvpo.train`` runs it with the defaults in ``configs/`` (``model=demo``,
``data=toy``, ``reward=toy``, ``trainer=demo``).
"""

from megatron_gvpo.demo.task import toy_reward
from megatron_gvpo.rewards import RewardInput, register_reward


@register_reward("toy_addition", override=True)
def toy_addition_reward(sample: RewardInput) -> float:
    """The demo task's reward: 1 when the last integer of the response is the sum, else 0
    (``demo.task.toy_reward``)."""
    return toy_reward(sample.response, sample.label or "")
