"""Reward functions by name, and what counts as a score (`validate_score`). Rewards are called in one place
only, the reward pool's worker processes (`rewards/pool.py`; the engines score every training and eval
sample there), through `get_reward` (`pool_worker.build_reward`) and `validate_score`: a thread could
neither be killed on a timeout nor take down what a reward started.

A reward function is a plain callable `fn(completion_text: str, prompt: Prompt) -> float`. Built-in ones
(`reasoning_gym`, `math`, `code`) register themselves with `@register_reward(name)` when their module is
imported; `get_reward` imports a built-in module on first use, so naming a reward never pays for the
heavy imports of the others. `rewards.name` may also be a dotted path to any function, imported on
demand: `my_pkg.my_rewards:exact_match` (or `my_pkg.my_rewards.exact_match`).
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from typing import Any, Callable

from megatron_oapl.rollout.types import Prompt

__all__ = ["RewardFn", "register_reward", "get_reward", "registered_rewards", "InvalidScore", "validate_score"]

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, Prompt], float]

_REGISTRY: dict[str, RewardFn] = {}
# Built-in rewards live in modules that import heavy libraries (reasoning-gym takes ~3 s to import);
# they are imported only when asked for by name.
_BUILTIN_MODULES = {
    "reasoning_gym": "megatron_oapl.rewards.reasoning_gym",
    "math": "megatron_oapl.rewards.math",
    "code": "megatron_oapl.rewards.code",
}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion_text, prompt) -> float` available as `rewards.name=<name>`."""
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        # Re-registering the same function (e.g. a module reloaded) is fine; a different one is a clash.
        if old is not None and _qualname(old) != _qualname(fn):
            raise ValueError(f"reward {name!r} is already registered to {_qualname(old)}; "
                             f"cannot register {_qualname(fn)} under the same name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    """Names `get_reward` accepts besides dotted paths (built-ins included, imported or not)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(f"rewards.name={name!r} {why} (allowed: one of {', '.join(registered_rewards())}, "
                      "or a dotted path pkg.module:function)")


def get_reward(name: str) -> RewardFn:
    """The reward function for a registered name or a dotted path `pkg.module:function`.

    Raises ValueError naming `rewards.name` (and listing the registered names) when nothing matches.
    """
    if not isinstance(name, str) or not name:
        raise _unknown(str(name), "is not a reward name")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])  # registers itself
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        raise _unknown(name, "is not a registered reward")
    if not module_name or not attr:
        raise _unknown(name, "is not a valid dotted path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _unknown(name, f"could not be imported: module {module_name!r} failed with {e}") from e
    obj: Any = module
    for part in attr.split("."):  # pkg.mod:Class.method works too
        if not hasattr(obj, part):
            raise _unknown(name, f"could not be imported: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _unknown(name, f"is not callable ({type(obj).__name__})")
    return obj


class InvalidScore(ValueError):
    """A reward function returned something that is not a score (counted as an error, scored 0)."""


def validate_score(raw: object, binarize: bool) -> float:
    """The score a reward function's return value stands for; the one place that decides what is valid.

    Valid: a finite `numbers.Real` -- int, float, bool, Fraction, numpy's real scalars (np.float32, np.int64).
    bool is accepted on purpose: Python's bool is an int, and a predicate reward (`return gold == answer`)
    means exactly 1.0 / 0.0; refusing it would turn every such reward into all errors. Everything else is
    an InvalidScore, never converted: "1.0" (str), None, bytes, numpy arrays (and numpy.bool_, which is not
    a Real), tensors, Decimal; so is a non-finite value.
    `binarize`: >= 1.0 (fully correct) -> 1.0, anything else -> 0.0.
    """
    if not isinstance(raw, numbers.Real):
        raise InvalidScore(f"returned {raw!r} ({type(raw).__name__}), not a real number (return a float)")
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. an int too large for a float
        raise InvalidScore(f"returned {raw!r}, which is not a float ({e})") from None
    if not math.isfinite(value):
        raise InvalidScore(f"returned the non-finite score {value}")
    if binarize:
        return 1.0 if value >= 1.0 else 0.0
    return value
