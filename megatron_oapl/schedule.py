"""The fixed lag schedule: one object both sides consult.

Policy version v is the weights pushed at the v-th sync (v = 0: the initial weights). The learner syncs
after every `sync_every` (L) optimizer steps, so after step s the current version is s // L, and the
inference policy lags pi_theta by (s mod L) steps. The buffer admits only groups whose version is
within `max_version_lag` of the current one (default 0: only the current policy, as OAPL's V_hat and
target assume) and counts what it drops. Groups leave the buffer by work-order index (rollout/orders.py),
never by arrival order, so a step's batch does not depend on engine timing. `offline` mode: one pre-generated dataset stands in for the
fleet of a whole round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def add(self, group: RolloutGroup) -> bool:
        if group.policy_version > self.current_version:
            raise ValueError(
                f"group of version {group.policy_version} is ahead of the current version {self.current_version}: "
                "an engine holds weights the learner has not pushed"
            )
        if not self.schedule.admissible(group.policy_version, self.current_version):
            self.dropped_stale += 1
            return False
        if group.order_index in self.groups:
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
        return [self.groups.pop(i) for i in indices]

    def __len__(self) -> int:
        return len(self.groups)
