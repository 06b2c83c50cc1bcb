"""The fixed lag schedule and the versioned buffer."""

from __future__ import annotations

import pytest

from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample
from megatron_oapl.schedule import LagSchedule, VersionedBuffer


def group(version: int, index: int = 0) -> RolloutGroup:
    return RolloutGroup(Prompt("p", [1]), [Sample([2], [-0.1], "stop", reward=1.0)], version, 1.0, 1.0,
                        order_index=index)


def test_syncs_exactly_after_multiples_of_L():
    schedule = LagSchedule(sync_every=3)
    assert [s for s in range(1, 11) if schedule.sync_after(s)] == [3, 6, 9]
    assert [schedule.version_after(s) for s in range(0, 8)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_buffer_admits_only_the_current_version_and_counts_drops():
    buffer = VersionedBuffer(LagSchedule(sync_every=2))
    assert buffer.add(group(0, 0)) and buffer.add(group(0, 1))
    assert buffer.advance(1) == 2  # both version-0 groups evicted at the sync
    assert not buffer.add(group(0, 2))  # a late version-0 group is refused
    assert buffer.add(group(1, 5))
    assert buffer.dropped_stale == 3 and len(buffer) == 1
    assert buffer.take(range(4, 6)) is None and [g.order_index for g in buffer.take(range(5, 6))] == [5]


def test_buffer_hands_out_by_order_index_not_arrival():
    buffer = VersionedBuffer(LagSchedule(sync_every=2))
    for index in (3, 1, 2):
        assert buffer.add(group(0, index))
    assert not buffer.add(group(0, 2)) and buffer.duplicates == 1  # a re-dealt order answered twice
    assert buffer.take(range(0, 2)) is None  # order 0 is still out
    assert buffer.add(group(0, 0))
    assert [g.order_index for g in buffer.take(range(0, 2))] == [0, 1]
    assert [g.order_index for g in buffer.take(range(2, 4))] == [2, 3]


def test_a_late_duplicate_of_a_trained_order_is_refused_not_kept():
    buffer = VersionedBuffer(LagSchedule(sync_every=2))
    assert buffer.add(group(0, 0)) and buffer.add(group(0, 1))
    assert len(buffer.take(range(0, 2))) == 2
    assert not buffer.add(group(0, 1))  # its re-dealt twin arrives after the step trained on order 1
    assert buffer.duplicates == 1 and len(buffer) == 0 and buffer.admitted == 2
    assert buffer.add(group(0, 2))  # the next orders are still admitted


def test_tolerance_keeps_one_older_version():
    buffer = VersionedBuffer(LagSchedule(sync_every=2, max_version_lag=1), current_version=3)
    assert buffer.add(group(2, 0)) and not buffer.add(group(1, 1))
    assert buffer.advance(4) == 1 and buffer.dropped_stale == 2


def test_a_group_from_the_future_is_an_error():
    with pytest.raises(ValueError, match="ahead of the current version"):
        VersionedBuffer(LagSchedule(2)).add(group(1))


@pytest.mark.parametrize("kwargs,field", [({"sync_every": 0}, "lag.sync_every"), ({"sync_every": 1, "max_version_lag": -1}, "lag.max_version_lag")])
def test_bad_schedule_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LagSchedule(**kwargs)


def test_orders_depend_only_on_the_step():
    from megatron_oapl.rollout.orders import OrderBook, PromptSampler

    def book():
        return OrderBook(PromptSampler(num_prompts=7, seed=3), run_seed=0, prompts_per_step=2, sync_every=3)

    a, b = book(), book()
    a.plan_round(step=1, version=0)  # steps 1-3 -> orders 0..5
    b.plan_round(step=2, version=0)  # a resume at step 2 plans orders 2..5, identical to a's
    assert sorted(a.open) == [("train", i) for i in range(6)] and sorted(b.open) == [("train", i) for i in range(2, 6)]
    assert all(a.open[k] == b.open[k] for k in b.open)
    # Each epoch of the sampler visits every prompt once.
    sampler = PromptSampler(num_prompts=7, seed=3)
    assert sorted(sampler.prompt_index(i) for i in range(7, 14)) == list(range(7))
    # Dealing and re-dealing: an engine's open orders return to the pool when it dies.
    deal = a.assign([0, 1])
    assert [o.index for o in deal[0]] == [0, 2, 4] and [o.index for o in deal[1]] == [1, 3, 5]
    assert a.delivered(("train", 1)) and not a.delivered(("train", 1))
    assert a.release(1) == 2 and [o.index for o in a.unassigned()] == [3, 5]
    # Eval orders share the book (their ranks among training orders: test_evaluation.py), same seed for a
    # prompt at every version.
    a.plan_eval(version=1, split="eval", num_prompts=3)
    assert [(o.split, o.index) for o in a.unassigned()] == [("eval", 0), ("eval", 1), ("eval", 2), ("train", 3),
                                                             ("train", 5)]
    assert a.open_evals() == 3
    b.plan_eval(version=4, split="eval", num_prompts=3)
    assert [b.open[("eval", i)].seed for i in range(3)] == [a.open[("eval", i)].seed for i in range(3)]
    assert len({a.open[("eval", i)].seed for i in range(3)}) == 3
