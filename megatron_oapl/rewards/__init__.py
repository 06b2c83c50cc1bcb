"""Reward functions `fn(completion_text, prompt) -> float` and the scorer the fleet calls.

- :mod:`.registry`: ``register_reward``, ``get_reward`` (registered name or dotted path ``pkg.mod:fn``),
  ``RewardScorer`` (never raises; timeouts, errors and non-finite scores count and score 0; binarize).
- :mod:`.reasoning_gym`: ``reasoning_gym`` — the task's own ``score_answer``.
- :mod:`.math`: ``math`` — math-verify against ``prompt.answer``.
- :mod:`.code`: ``code`` — stdin/stdout tests, each run fenced by :mod:`.sandbox` (bubblewrap + rlimits).

The built-in reward modules import heavy libraries, so they are imported by ``get_reward`` on first use,
not here.
"""

from .registry import RewardFn, RewardScorer, get_reward, register_reward, registered_rewards

__all__ = ["RewardFn", "RewardScorer", "get_reward", "register_reward", "registered_rewards"]
