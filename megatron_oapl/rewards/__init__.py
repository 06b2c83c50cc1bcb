"""Reward functions `fn(completion_text, prompt) -> float` and the one place that runs them.

- :mod:`.registry`: ``register_reward``, ``get_reward`` (registered name or dotted path ``pkg.mod:fn``),
  ``validate_score`` (what counts as a score; binarize).
- :mod:`.pool`: ``RewardPool``, worker processes that score beside an engine's sampling (timeouts, errors
  and non-finite scores count and score 0; whatever a reward started is killed).
- :mod:`.reasoning_gym`: ``reasoning_gym`` — the task's own ``score_answer``.
- :mod:`.math`: ``math`` — math-verify against ``prompt.answer``.
- :mod:`.code`: ``code`` — stdin/stdout tests, each run fenced by :mod:`.sandbox` (bubblewrap + rlimits).

The built-in reward modules import heavy libraries, so they are imported by ``get_reward`` on first use,
not here.
"""

from .registry import RewardFn, get_reward, register_reward, registered_rewards, validate_score

__all__ = ["RewardFn", "get_reward", "register_reward", "registered_rewards", "validate_score"]
