"""Rollout work orders: which prompt, with which seed, for which optimizer step.

The coordinator does not let engines pick prompts: it hands out orders. Order `i` is the `i % P`-th group
of optimizer step `i // P + 1` (P = fleet.prompts_per_step); its prompt is position `i` of a seeded
epoch-by-epoch shuffle of the training prompts, and its sampling seed is a function of (run seed, i).
So what a step trains on depends only on the step number — not on which engine served it, how fast
the engines were, or whether one died and its orders went to another — and resuming from a checkpoint
at step s continues the same stream at order s * P (the "sampler position").

Engines sample every order with its own seed (one generate call per order), so a group is the same
whichever engine produces it.

Evaluation goes through the same book: the coordinator plans one eval order per prompt of each eval set
(split "eval" for the data section's held-out prompts, "eval/<set>" for eval.sets.<set>) for a freshly
pushed version. They are dealt at once and ranked *between* the coming round's training orders, spread
evenly over all of its steps but the last (`eval_ranks`), so engines sample them beside training and they
are back before the round's last step; that step (and the push after it) waits only for the few still
missing, as an engine drops orders of older versions when it syncs (an evaluation scores exactly one
version). Orders are keyed by (split, index): eval prompt i of a set is (split, i) whatever the version.

`sampling_params` is the one place that builds an order's sampling parameters (training group size and
temperature; an eval set's num_samples and eval.temperature).

Dynamic sampling (fleet.dynamic_sampling): a step no longer owns a fixed range of orders. From its start
position it takes, in index order, the first P groups whose raw scores are not all equal (`fill_step`);
its end is one past the last index it looked at, and the next step starts there. A step that has looked
at `dynamic_sampling_limit` orders without finding P stops there (capped). The book over-issues orders
of the current version (`planning_horizon`); which groups a step takes depends only on the groups'
contents in index order, never on arrival. Orders left over at a round's end are of the old version:
the engines drop them at the push and the book deals them again, same index and seed, for the new one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Order:
    index: int  # global position in the run's stream of groups
    prompt_index: int  # into the training prompts
    seed: int  # sampling seed of this group
    version: int  # the policy version that must sample it
    split: str = "train"  # "train": a training group; "eval" / "eval/<set>": pass@k samples of an eval prompt
    rank: float | None = None  # dealing and submission order (None: the index); eval orders sit between train ones

    @property
    def priority(self) -> float:
        return self.index if self.rank is None else self.rank

    @property
    def key(self) -> tuple[str, int]:
        return self.split, self.index


class PromptSampler:
    """Random access into an endless stream of training-prompt indices: epoch e is a permutation of
    range(num_prompts) seeded by (seed, e); position i is entry i % N of epoch i // N."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("the prompt sampler needs at least one training prompt")
        self.num_prompts, self.seed = num_prompts, seed
        self._epoch, self._perm = -1, []

    def prompt_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_prompts)
        if epoch != self._epoch:
            self._perm = list(range(self.num_prompts))
            random.Random(f"prompts/{self.seed}/{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm[offset]


def step_orders(step: int, prompts_per_step: int, start_step: int = 1, start_position: int = 0) -> range:
    """The order indices of optimizer step `step` in a stream that was at `start_position` at `start_step`
    (after step s, `step_orders(s, ...).stop` is the sampler position a checkpoint stores)."""
    first = start_position + (step - start_step) * prompts_per_step
    return range(first, first + prompts_per_step)


# --------------------------------------------------------------------------------------------------
# Dynamic sampling: step boundaries from the groups' raw scores, in index order
# --------------------------------------------------------------------------------------------------


def all_equal(scores: Sequence[float]) -> bool:
    """A degenerate group: every raw score equals the first (no signal to rank its samples by)."""
    return all(s == scores[0] for s in scores)


def dynamic_sampling_limit(prompts_per_step: int, max_orders: float) -> int:
    """Orders one step may look at: fleet.dynamic_sampling_max_orders x prompts_per_step (at least P)."""
    return max(prompts_per_step, math.floor(prompts_per_step * max_orders))


def check_prompt_count(cfg, num_prompts: int) -> None:
    """Dynamic sampling refills a step with other prompts: it needs at least prompts_per_step training
    prompts (ConfigError otherwise, raised before any engine starts)."""
    from megatron_oapl.config import ConfigError

    if cfg.fleet.dynamic_sampling and cfg.fleet.prompts_per_step > num_prompts:
        raise ConfigError(f"fleet.prompts_per_step={cfg.fleet.prompts_per_step} is larger than the {num_prompts} "
                          "training prompts: fleet.dynamic_sampling=true could never refill a step (allowed: "
                          f"prompts_per_step <= {num_prompts}, or dynamic_sampling=false)")


@dataclass(frozen=True)
class StepFill:
    """What one dynamically sampled step looked at and takes."""

    start: int  # first order index it looked at
    end: int  # one past the last: the next step's start
    taken: tuple[int, ...]  # the orders it trains on, in index order
    capped: bool  # the limit was reached before P non-degenerate groups were found

    @property
    def looked(self) -> int:
        return self.end - self.start

    def metrics_counts(self, per_step: int) -> tuple[int, int]:
        """(degenerate groups dropped, orders looked at beyond P)."""
        return self.looked - len(self.taken), self.looked - per_step


def fill_step(start: int, per_step: int, limit: int, degenerate: Callable[[int], bool | None]) -> StepFill | None:
    """The step that starts at order `start`: the first `per_step` orders (in index order) whose group is not
    degenerate, looking at no more than `limit` orders. `degenerate(i)` is None while group i is not in yet:
    then None (undecided). A capped step takes the non-degenerate groups it found, topped up with the earliest
    degenerate ones it looked at, so every step trains on `per_step` groups (the batch always splits over
    the data-parallel ranks and micro-batches as configured; under OAPL such a group still anchors pi_theta
    to pi_lag)."""
    found: list[int] = []
    dropped: list[int] = []
    for index in range(start, start + limit):
        flag = degenerate(index)
        if flag is None:
            return None
        (dropped if flag else found).append(index)
        if len(found) == per_step:
            return StepFill(start, index + 1, tuple(found), capped=False)
    taken = sorted(found + dropped[: per_step - len(found)])
    return StepFill(start, start + limit, tuple(taken), capped=True)


def planning_horizon(start: int, steps: int, per_step: int, limit: int, degenerate: Callable[[int], bool | None],
                     expected_degenerate: float = 0.0) -> int:
    """One past the last order the next `steps` steps (from order `start`) are expected to need: groups in
    already count as they are; each group not in yet counts as non-degenerate with probability
    1 - `expected_degenerate` (capped at 0.9: the limit bounds a step anyway). Issuing orders up to here
    before they are needed keeps a refill from waiting a whole generation for each wave of top-ups."""
    signal = 1.0 - min(max(expected_degenerate, 0.0), 0.9)
    position = start
    for _ in range(steps):
        step_start, found = position, 0.0
        while found < per_step - 1e-9 and position < step_start + limit:
            flag = degenerate(position)
            found += signal if flag is None else float(not flag)
            position += 1
    return position


def eval_split(set_name: str | None) -> str:
    """The order split of an eval set (None: the data section's held-out prompts)."""
    return "eval" if set_name is None else f"eval/{set_name}"


def eval_ranks(num_orders: int, round_orders: range, per_step: int) -> list[float]:
    """Ranks that spread `num_orders` eval orders evenly over a lag round's training orders, all before the
    round's last step (or within it, for a one-step round), so the learner's steps keep going while they
    are sampled and the round-ending push rarely waits on them."""
    span = max(len(round_orders) - per_step, min(per_step, len(round_orders)))
    return [round_orders.start + (j + 1) * span / (num_orders + 1) - 0.5 for j in range(num_orders)]


def sampling_params(cfg, split: str, stop_token_ids: tuple[int, ...] = (), seed: int | None = None):
    """The sampling parameters of an order of `split` (train, eval or eval/<set>)."""
    from megatron_oapl.rollout.types import SamplingParams

    fleet = cfg.fleet
    if split == "train":
        n, temperature = fleet.group_size, fleet.temperature
    else:
        spec = cfg.eval.sets[split.removeprefix("eval/")] if split.startswith("eval/") else {}
        n, temperature = spec.get("num_samples", cfg.eval.num_samples), cfg.eval.temperature
    return SamplingParams(n=n, temperature=temperature, top_p=fleet.top_p, max_new_tokens=fleet.max_new_tokens,
                          stop_token_ids=tuple(stop_token_ids), seed=seed)


def order_seed(run_seed: int, index: int, split: str = "train") -> int:
    """Sampling seed of an order. Eval prompt i gets the same seed at every version, so evaluations of
    successive versions differ by the policy, not by the draw."""
    prefix = "orders" if split == "train" else split
    return random.Random(f"{prefix}/{run_seed}/{index}").getrandbits(62)


class OrderBook:
    """Coordinator-side: the orders of the current round, who holds them, and which are done."""

    def __init__(self, sampler: PromptSampler, run_seed: int, prompts_per_step: int, sync_every: int,
                 start_step: int = 1, start_position: int = 0, dynamic_limit: int | None = None):
        """`start_position` is the sampler position (orders issued before) at `start_step`: 0 at step 1
        of a fresh run, the checkpoint's position on resume. `dynamic_limit` (dynamic sampling): the most
        orders one step may look at; None: step s owns the fixed range `step_orders(s)`."""
        self.sampler, self.run_seed = sampler, run_seed
        self.per_step, self.sync_every = prompts_per_step, sync_every
        self.start_step, self.start_position = start_step, start_position
        self.dynamic_limit = dynamic_limit
        self.open: dict[tuple[str, int], Order] = {}  # planned, not yet delivered
        self.holder: dict[tuple[str, int], int] = {}  # order key -> engine id it was sent to
        self.planned_until = start_position  # exclusive end of the planned index range
        self.planned_version: int | None = None  # the version of the training orders planned last
        self.starts: dict[int, int] = {start_step: start_position}  # step -> its first order index

    def indices(self, step: int) -> range:
        """The order indices whose groups make up optimizer step `step` (fixed ranges only)."""
        return step_orders(step, self.per_step, self.start_step, self.start_position)

    def step_start(self, step: int) -> int:
        """The first order index of `step` (dynamic sampling: known once the step before it was taken)."""
        return self.indices(step).start if self.dynamic_limit is None else self.starts[step]

    def step_taken(self, step: int, end: int) -> None:
        """Step `step` looked at orders up to `end` (exclusive): the next step starts there."""
        self.starts[step + 1] = end
        self.starts.pop(step, None)

    def plan_round(self, step: int, version: int, degenerate: Callable[[int], bool | None] | None = None,
                   expected_degenerate: float = 0.0) -> None:
        """Plan the orders of every step from `step` to the end of its lag round (idempotent). Dynamic
        sampling: as many as `planning_horizon` expects the round's remaining steps to look at, given the
        groups in so far (`degenerate(i)`: None while group i is not in); called again as groups arrive,
        it tops the book up. A new `version` first re-issues the orders planned beyond `step`'s start for
        it (the engines dropped the older ones at the push; same index, same seed)."""
        round_end = -(-step // self.sync_every) * self.sync_every
        if self.dynamic_limit is None:
            start = max(self.planned_until, self.indices(step).start)
            end = self.indices(round_end).stop
        else:
            first = self.starts[step]
            degenerate = degenerate or (lambda index: None)
            if self.planned_version is not None and version != self.planned_version:
                for index in range(first, self.planned_until):
                    if degenerate(index) is None:  # not in the buffer (still admitted groups are kept)
                        self._plan(index, version)
            end = planning_horizon(first, round_end - step + 1, self.per_step, self.dynamic_limit,
                                   degenerate, expected_degenerate)
            start = max(self.planned_until, first)
        self.planned_version = version
        for index in range(start, end):
            self._plan(index, version)
        self.planned_until = max(self.planned_until, end)

    def _plan(self, index: int, version: int) -> None:
        order = Order(index, self.sampler.prompt_index(index), order_seed(self.run_seed, index), version)
        self.open[order.key] = order
        self.holder.pop(order.key, None)  # a re-issued order is dealt again

    def plan_eval(self, version: int, split: str, num_prompts: int, after_step: int | None = None) -> None:
        """One eval order per prompt of eval split `split`, to be sampled by `version`, which was pushed
        after `after_step` (None: no training follows, ranks are the prompt indices)."""
        ranks = (range(num_prompts) if after_step is None else
                 eval_ranks(num_prompts, self.round_indices(after_step + 1), self.per_step))
        for i, rank in zip(range(num_prompts), ranks):
            order = Order(i, i, order_seed(self.run_seed, i, split), version, split, float(rank))
            self.open[order.key] = order

    def round_indices(self, step: int) -> range:
        """The training order indices of the lag round that starts at `step` (dynamic sampling: the P per
        step it would take without a degenerate group)."""
        round_end = -(-step // self.sync_every) * self.sync_every
        if self.dynamic_limit is None:
            start = self.indices(step).start
        else:
            start = self.starts.get(step, self.planned_until)
        return range(start, start + (round_end - step + 1) * self.per_step)

    def open_evals(self) -> int:
        return sum(split != "train" for split, _ in self.open)

    def unassigned(self) -> list[Order]:
        """Orders not dealt yet, by rank: training orders by index, eval orders between them."""
        return sorted((o for k, o in self.open.items() if k not in self.holder), key=lambda o: o.priority)

    def assign(self, engine_ids: list[int]) -> dict[int, list[Order]]:
        """Deal every unassigned order round-robin over `engine_ids` (up to date engines)."""
        deal: dict[int, list[Order]] = {e: [] for e in engine_ids}
        if not engine_ids:
            return {}
        for k, order in enumerate(self.unassigned()):
            engine = engine_ids[k % len(engine_ids)]
            deal[engine].append(order)
            self.holder[order.key] = engine
        return {e: orders for e, orders in deal.items() if orders}

    def delivered(self, key: tuple[str, int]) -> bool:
        """A group for order `key` arrived; False if it was not open (a duplicate or unknown)."""
        self.holder.pop(key, None)
        return self.open.pop(key, None) is not None

    def release(self, engine_id: int) -> int:
        """Engine `engine_id` died or was re-synced (dropping its queue): its open orders go back to the
        pool. Returns how many."""
        lost = [i for i, e in self.holder.items() if e == engine_id]
        for i in lost:
            del self.holder[i]
        return len(lost)
