"""The fixed lag schedule and the versioned buffer."""

from __future__ import annotations

import pytest

from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample
from megatron_oapl.schedule import LagSchedule, VersionedBuffer


def group(version: int) -> RolloutGroup:
    return RolloutGroup(Prompt("p", [1]), [Sample([2], [-0.1], "stop", reward=1.0)], version, 1.0, 1.0)


def test_syncs_exactly_after_multiples_of_L():
    schedule = LagSchedule(sync_every=3)
    assert [s for s in range(1, 11) if schedule.sync_after(s)] == [3, 6, 9]
    assert [schedule.version_after(s) for s in range(0, 8)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_buffer_admits_only_the_current_version_and_counts_drops():
    buffer = VersionedBuffer(LagSchedule(sync_every=2))
    assert buffer.add(group(0)) and buffer.add(group(0))
    assert buffer.advance(1) == 2  # both version-0 groups evicted at the sync
    assert not buffer.add(group(0))  # a late version-0 group is refused
    assert buffer.add(group(1))
    assert buffer.dropped_stale == 3 and len(buffer) == 1
    assert buffer.take(2) is None and [g.policy_version for g in buffer.take(1)] == [1]


def test_tolerance_keeps_one_older_version():
    buffer = VersionedBuffer(LagSchedule(sync_every=2, max_version_lag=1), current_version=3)
    assert buffer.add(group(2)) and not buffer.add(group(1))
    assert buffer.advance(4) == 1 and buffer.dropped_stale == 2


def test_a_group_from_the_future_is_an_error():
    with pytest.raises(ValueError, match="ahead of the current version"):
        VersionedBuffer(LagSchedule(2)).add(group(1))


@pytest.mark.parametrize("kwargs,field", [({"sync_every": 0}, "lag.sync_every"), ({"sync_every": 1, "max_version_lag": -1}, "lag.max_version_lag")])
def test_bad_schedule_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LagSchedule(**kwargs)
