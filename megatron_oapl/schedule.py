"""The fixed lag schedule: one object both sides consult.

Policy version v is the weights pushed at the v-th sync (v = 0: the initial weights). The learner syncs
after every `sync_every` (L) optimizer steps, so after step s the current version is s // L, and the
inference policy lags pi_theta by (s mod L) steps. The buffer admits only groups whose version is
within `max_version_lag` of the current one (default 0: only the current policy, as OAPL's V_hat and
target assume) and counts what it drops. Groups leave the buffer by work-order index (rollout/orders.py),
never by arrival order, so a step's batch does not depend on engine timing (`StepAssembler`: fixed ranges,
or with dynamic sampling the first P groups with differing raw scores from the step's start). `offline`
mode: one pre-generated dataset stands in for the fleet of a whole round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_oapl import metrics as M
from megatron_oapl.rollout.orders import OrderBook, StepFill, all_equal, fill_step
from megatron_oapl.rollout.types import RolloutGroup


@dataclass(frozen=True)
class LagSchedule:
    sync_every: int
    max_version_lag: int = 0

    def __post_init__(self):
        if self.sync_every < 1:
            raise ValueError(f"lag.sync_every={self.sync_every} must be >= 1")
        if self.max_version_lag < 0:
            raise ValueError(f"lag.max_version_lag={self.max_version_lag} must be >= 0")

    @classmethod
    def from_config(cls, lag_cfg) -> "LagSchedule":
        return cls(lag_cfg.sync_every, lag_cfg.max_version_lag)

    def version_after(self, steps_done: int) -> int:
        """The policy version the fleet holds once `steps_done` optimizer steps (and their syncs) ran."""
        return steps_done // self.sync_every

    def sync_after(self, step: int) -> bool:
        """Whether to push weights right after optimizer step `step` (1-based count of steps done)."""
        return step > 0 and step % self.sync_every == 0

    def admissible(self, group_version: int, current_version: int) -> bool:
        return current_version - self.max_version_lag <= group_version <= current_version


@dataclass
class VersionedBuffer:
    """Rollout groups waiting for the learner, keyed by work-order index, filtered by the lag schedule."""

    schedule: LagSchedule
    current_version: int = 0
    groups: dict[int, RolloutGroup] = field(default_factory=dict)
    dropped_stale: int = 0  # groups refused or evicted for being of an older version
    duplicates: int = 0  # a second group for an order (its engine was presumed dead and the order re-dealt)
    admitted: int = 0
    taken_below: int = 0  # steps take orders in index ranges from the sampler position: all below are done

    def add(self, group: RolloutGroup) -> bool:
        if group.policy_version > self.current_version:
            raise ValueError(
                f"group of version {group.policy_version} is ahead of the current version {self.current_version}: "
                "an engine holds weights the learner has not pushed"
            )
        if not self.schedule.admissible(group.policy_version, self.current_version):
            self.dropped_stale += 1
            return False
        if group.order_index in self.groups or group.order_index < self.taken_below:
            # A re-dealt order answered twice; if its first group was already trained on, the late one would
            # otherwise wait in the buffer for a step that never asks for it.
            self.duplicates += 1
            return False
        self.groups[group.order_index] = group
        self.admitted += 1
        return True

    def advance(self, version: int) -> int:
        """A sync to `version` happened: evict groups that are no longer admissible; returns how many."""
        self.current_version = version
        kept = {i: g for i, g in self.groups.items() if self.schedule.admissible(g.policy_version, version)}
        evicted = len(self.groups) - len(kept)
        self.groups = kept
        self.dropped_stale += evicted
        return evicted

    def take(self, indices: range) -> list[RolloutGroup] | None:
        """The groups of these order indices, in index order, or None until all of them are here."""
        if any(i not in self.groups for i in indices):
            return None
        self.taken_below = max(self.taken_below, indices.stop)
        return [self.groups.pop(i) for i in indices]

    def __len__(self) -> int:
        return len(self.groups)


class SamplingTally:
    """Per-step and run counts of what dynamic sampling looked at (zeros without it)."""

    def __init__(self, per_step: int):
        self.per_step = per_step
        self.last: StepFill | None = None
        self.looked_total = self.dropped_total = self.capped_total = 0

    def add(self, fill: StepFill) -> None:
        self.last = fill
        self.looked_total += fill.looked
        self.dropped_total += fill.looked - len(fill.taken)
        self.capped_total += fill.capped

    @property
    def degenerate_rate(self) -> float:
        """Share of the orders looked at so far whose group was dropped (the planner's expectation)."""
        return self.dropped_total / self.looked_total if self.looked_total else 0.0

    def metrics(self) -> dict[str, float]:
        dropped, extra = self.last.metrics_counts(self.per_step) if self.last else (0, 0)
        return {M.DEGENERATE_DROPPED: dropped, M.EXTRA_ORDERS: extra, M.DYNAMIC_SAMPLING_CAPPED: self.capped_total}


class StepAssembler:
    """Which groups make up each optimizer step: plans (and, with dynamic sampling, tops up) the book's
    orders, admits arriving groups to the buffer, and takes a step's groups by order index once every
    group it must look at is in."""

    def __init__(self, book: OrderBook, buffer: VersionedBuffer):
        self.book, self.buffer = book, buffer
        self.tally = SamplingTally(book.per_step)

    def plan(self, step: int, version: int) -> None:
        self.book.plan_round(step, version, self.degenerate, self.tally.degenerate_rate)

    def received(self, group: RolloutGroup) -> bool:
        """A training group arrived: admitted (and its order done) unless stale or a duplicate."""
        if not self.buffer.add(group):
            return False
        self.book.delivered(("train", group.order_index))
        return True

    def degenerate(self, index: int) -> bool | None:
        """Whether the group of order `index` has all-equal raw scores; None while it is not in."""
        group = self.buffer.groups.get(index)
        return None if group is None else all_equal(group.rewards)

    def fill(self, step: int) -> StepFill | None:
        """What `step` looks at and takes, once every group it must look at is in (else None)."""
        book = self.book
        if book.dynamic_limit is None:
            indices = book.indices(step)
            if any(i not in self.buffer.groups for i in indices):
                return None
            return StepFill(indices.start, indices.stop, tuple(indices), capped=False)
        return fill_step(book.step_start(step), book.per_step, book.dynamic_limit, self.degenerate)

    def take(self, step: int) -> tuple[list[RolloutGroup], int] | None:
        """(`step`'s groups in index order, the sampler position after it), or None until they are in. The
        groups it skipped leave the buffer with them."""
        fill = self.fill(step)
        if fill is None:
            return None
        looked = self.buffer.take(range(fill.start, fill.end))
        self.book.step_taken(step, fill.end)
        self.tally.add(fill)
        return [g for g in looked if g.order_index in fill.taken], fill.end

    def progress(self, step: int) -> tuple[int, int]:
        """(groups in, groups wanted) for a stall warning; with dynamic sampling, groups with differing
        scores in a row from the step's start."""
        book = self.book
        if book.dynamic_limit is None:
            return sum(i in self.buffer.groups for i in book.indices(step)), book.per_step
        start, have = book.step_start(step), 0
        for index in range(start, start + book.dynamic_limit):
            flag = self.degenerate(index)
            if flag is None or have == book.per_step:
                break
            have += not flag
        return have, book.per_step
