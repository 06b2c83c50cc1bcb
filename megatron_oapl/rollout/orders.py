"""Rollout work orders: which prompt, with which seed, for which optimizer step.

The coordinator does not let engines pick prompts: it hands out orders. Order `i` is the `i % P`-th group
of optimizer step `i // P + 1` (P = fleet.prompts_per_step); its prompt is position `i` of a seeded
epoch-by-epoch shuffle of the training prompts, and its sampling seed is a function of (run seed, i).
So what a step trains on depends only on the step number — not on which engine served it, how fast
the engines were, or whether one died and its orders went to another — and resuming from a checkpoint
at step s continues the same stream at order s * P (the "sampler position").

Engines sample every order with its own seed (one generate call per order), so a group is the same
whichever engine produces it.

Evaluation goes through the same book: with eval.every > 0 the coordinator plans one "eval" order per
held-out prompt for a freshly pushed version; they are dealt after the round's training orders and
must all come back before the next push (an engine drops orders of older versions when it syncs).
Orders are keyed by (split, index): eval prompt i is ("eval", i) whatever the version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Order:
    index: int  # global position in the run's stream of groups
    prompt_index: int  # into the training prompts
    seed: int  # sampling seed of this group
    version: int  # the policy version that must sample it
    split: str = "train"  # "train": a training group; "eval": pass@k samples of a held-out prompt

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


def order_seed(run_seed: int, index: int, split: str = "train") -> int:
    """Sampling seed of an order. Eval prompt i gets the same seed at every version, so evaluations of
    successive versions differ by the policy, not by the draw."""
    prefix = "orders" if split == "train" else split
    return random.Random(f"{prefix}/{run_seed}/{index}").getrandbits(62)


class OrderBook:
    """Coordinator-side: the orders of the current round, who holds them, and which are done."""

    def __init__(self, sampler: PromptSampler, run_seed: int, prompts_per_step: int, sync_every: int,
                 start_step: int = 1, start_position: int = 0):
        """`start_position` is the sampler position (orders issued before) at `start_step`: 0 at step 1
        of a fresh run, the checkpoint's position on resume."""
        self.sampler, self.run_seed = sampler, run_seed
        self.per_step, self.sync_every = prompts_per_step, sync_every
        self.start_step, self.start_position = start_step, start_position
        self.open: dict[tuple[str, int], Order] = {}  # planned, not yet delivered
        self.holder: dict[tuple[str, int], int] = {}  # order key -> engine id it was sent to
        self.planned_until = start_position  # exclusive end of the planned index range

    def indices(self, step: int) -> range:
        """The order indices whose groups make up optimizer step `step`."""
        return step_orders(step, self.per_step, self.start_step, self.start_position)

    def plan_round(self, step: int, version: int) -> None:
        """Plan the orders of every step from `step` to the end of its lag round (idempotent)."""
        round_end = -(-step // self.sync_every) * self.sync_every
        start = max(self.planned_until, self.indices(step).start)
        end = self.indices(round_end).stop
        for index in range(start, end):
            order = Order(index, self.sampler.prompt_index(index), order_seed(self.run_seed, index), version)
            self.open[order.key] = order
        self.planned_until = max(self.planned_until, end)

    def plan_eval(self, version: int, num_prompts: int) -> None:
        """One eval order per held-out prompt, to be sampled by `version`."""
        for i in range(num_prompts):
            order = Order(i, i, order_seed(self.run_seed, i, "eval"), version, "eval")
            self.open[order.key] = order

    def open_evals(self) -> int:
        return sum(split == "eval" for split, _ in self.open)

    def unassigned(self) -> list[Order]:
        """Orders not dealt yet: training orders first (the learner waits on them), then eval orders."""
        return sorted((o for k, o in self.open.items() if k not in self.holder),
                      key=lambda o: (o.split != "train", o.index))

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
