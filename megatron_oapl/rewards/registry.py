"""Reward functions by name, what counts as a score (`validate_score`), and `RewardScorer`, which scores one
completion in this process (evaluation, tests). The fleet's engines score in worker processes instead
(`rewards/pool.py`), through the same `build_reward` and `validate_score`.

A reward function is a plain callable `fn(completion_text: str, prompt: Prompt) -> float`. Built-in ones
(`reasoning_gym`, `math`, `code`) register themselves with `@register_reward(name)` when their module is
imported; `get_reward` imports a built-in module on first use, so naming a reward never pays for the
heavy imports of the others. `rewards.name` may also be a dotted path to any function, imported on
demand: `my_pkg.my_rewards:exact_match` (or `my_pkg.my_rewards.exact_match`).

    scorer = RewardScorer(cfg.rewards)         # name, binarize, timeout_s
    sample.reward = scorer.score(sample.text, prompt)   # never raises
    scorer.stats()                             # {"calls": ..., "errors": ..., "timeouts": ...}
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import threading
from typing import Any, Callable

from megatron_oapl.rollout.types import Prompt

__all__ = ["RewardFn", "register_reward", "get_reward", "registered_rewards", "InvalidScore", "validate_score",
           "RewardScorer"]

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


def build_reward(cfg_rewards: Any) -> RewardFn:
    """The reward `cfg_rewards.name` names, set up by the rest of the section (`code`: its sandbox,
    `rewards.code_sandbox`; a ValueError naming that field when the sandbox cannot run here)."""
    if cfg_rewards.name == "code":
        from megatron_oapl.rewards.code import build_code_reward

        return build_code_reward(cfg_rewards)
    return get_reward(cfg_rewards.name)


class RewardScorer:
    """Wraps a reward function so that scoring never raises and never blocks longer than timeout_s.

    - An exception or a result `validate_score` refuses (not a finite real number) counts in `errors` and
      scores 0.0 (the first few are logged with their message, so a broken reward is visible without
      flooding the log).
    - A call still running after `timeout_s` counts in `timeouts` and scores 0.0. The function runs in a
      daemon worker thread that `join(timeout)` gives up on; Python cannot kill a thread, so a truly hung
      reward keeps its thread (and whatever it holds) alive until it returns or the process exits
      (`stats()["hung"]` counts such threads). Rewards that can hang for real must bound themselves:
      the `code` reward runs programs in subprocesses with hard CPU, memory and wall-clock limits.
    - `binarize=True` maps a score to 1.0 if it is >= 1.0 (i.e. fully correct) and to 0.0 otherwise:
      reasoning-gym's scorers give partial credit to answers that merely contain the right one.

    Safe to call from several threads at once (the counters are locked).
    """

    LOG_FIRST_ERRORS = 5

    def __init__(self, cfg_rewards: Any, fn: RewardFn | None = None):
        """cfg_rewards: a `RewardsConfig` (name, binarize, timeout_s). fn overrides the named function."""
        self.name: str = cfg_rewards.name
        self.binarize: bool = bool(cfg_rewards.binarize)
        self.timeout_s: float = float(cfg_rewards.timeout_s)
        self.fn: RewardFn = fn if fn is not None else build_reward(cfg_rewards)
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self._lock = threading.Lock()
        self._hung: list[threading.Thread] = []

    def __call__(self, text: str, prompt: Prompt) -> float:
        return self.score(text, prompt)

    def score(self, text: str, prompt: Prompt) -> float:
        """The reward of one completion; 0.0 on error or timeout (counted, never raised)."""
        with self._lock:
            self.calls += 1
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = self.fn(text, prompt)
            except BaseException as e:  # noqa: BLE001 - anything the reward does is its own problem
                box["error"] = e

        worker = threading.Thread(target=work, name=f"reward-{self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            with self._lock:
                self.timeouts += 1
                self._hung.append(worker)
                n = self.timeouts
            if n <= self.LOG_FIRST_ERRORS:
                logger.warning("reward %r timed out after %.1f s on prompt %s (scored 0; timeout #%d)",
                               self.name, self.timeout_s, prompt.prompt_id, n)
            return 0.0
        if "error" in box:
            return self._error(prompt, f"{type(box['error']).__name__}: {box['error']}")
        try:
            return validate_score(box["value"], self.binarize)
        except InvalidScore as e:
            return self._error(prompt, str(e))

    def _error(self, prompt: Prompt, message: str) -> float:
        with self._lock:
            self.errors += 1
            n = self.errors
        if n <= self.LOG_FIRST_ERRORS:
            more = " (further errors are only counted)" if n == self.LOG_FIRST_ERRORS else ""
            logger.warning("reward %r failed on prompt %s: %s (scored 0; error #%d)%s",
                           self.name, prompt.prompt_id, message, n, more)
        return 0.0

    def stats(self) -> dict[str, int]:
        """Counters since construction: calls, errors, timeouts, and timed-out threads still running."""
        with self._lock:
            self._hung = [t for t in self._hung if t.is_alive()]
            return {"calls": self.calls, "errors": self.errors, "timeouts": self.timeouts,
                    "hung": len(self._hung)}
