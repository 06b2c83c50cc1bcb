"""Dynamic sampling: step boundaries from the groups' raw scores in index order (hand-computed cases), the
order book's over-issuing across a push, the offline reader, and the config's one-line errors."""

from __future__ import annotations

import random

import pytest

from megatron_oapl.config import ConfigError, load_config
from megatron_oapl.rollout.dataset import write_groups
from megatron_oapl.rollout.orders import (
    OrderBook,
    PromptSampler,
    StepFill,
    check_prompt_count,
    dynamic_sampling_limit,
    fill_step,
    order_seed,
    planning_horizon,
)
from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample
from megatron_oapl.rollout_sources import DatasetRollouts
from megatron_oapl.schedule import LagSchedule, StepAssembler, VersionedBuffer

D, S = True, False  # a degenerate group (all scores equal), a group with a signal


def flags(start: int, pattern: list[bool]):
    """degenerate(i) for orders start.. (None past the pattern: not in yet)."""
    return lambda i: pattern[i - start] if 0 <= i - start < len(pattern) else None


# ------------------------------------------------------------------------------------ refill accounting


def test_a_step_skips_degenerate_groups_and_ends_after_the_last_it_looked_at():
    fill = fill_step(10, per_step=3, limit=9, degenerate=flags(10, [S, D, D, S, D, S, S, S]))
    assert fill == StepFill(start=10, end=16, taken=(10, 13, 15), capped=False)
    assert fill.looked == 6 and fill.metrics_counts(3) == (3, 3)  # 3 dropped, 3 orders beyond P


def test_a_step_without_degenerate_groups_is_the_fixed_range():
    fill = fill_step(8, per_step=4, limit=12, degenerate=flags(8, [S] * 4))
    assert fill == StepFill(8, 12, (8, 9, 10, 11), capped=False) and fill.metrics_counts(4) == (0, 0)


def test_a_step_waits_for_a_missing_group_before_it_but_not_after_its_last():
    assert fill_step(0, 2, 6, flags(0, [S, D])) is None  # order 2 decides whether 3 is looked at
    pattern = [S, D, S]  # order 3 and later are not in: not needed
    assert fill_step(0, 2, 6, flags(0, pattern)) == StepFill(0, 3, (0, 2), capped=False)


def test_the_limit_caps_a_step_and_tops_it_up_with_the_first_degenerate_groups():
    # limit 5: looked at 20..24, found one signal group (22); topped up with 20 (the first degenerate one)
    fill = fill_step(20, per_step=2, limit=5, degenerate=flags(20, [D, D, S, D, D, S]))
    assert fill == StepFill(20, 25, (20, 22), capped=True)
    assert fill.metrics_counts(2) == (3, 3)  # 21, 23, 24 dropped; 3 orders beyond P
    assert fill_step(0, 2, 3, flags(0, [D, D, D])) == StepFill(0, 3, (0, 1), capped=True)


def test_steps_of_a_round_follow_each_other():
    """Two steps of P=2 over one stream: the second starts where the first stopped."""
    pattern = [D, S, S, D, D, S, D, S]
    first = fill_step(0, 2, 6, flags(0, pattern))
    second = fill_step(first.end, 2, 6, flags(0, pattern))
    assert (first.taken, first.end) == ((1, 2), 3)
    assert (second.taken, second.end) == ((5, 7), 8)


def test_limit_is_the_multiple_of_prompts_per_step_rounded_down():
    assert dynamic_sampling_limit(4, 2.5) == 10
    assert dynamic_sampling_limit(3, 1.0) == 3
    assert dynamic_sampling_limit(3, 1.5) == 4


def test_planning_horizon_counts_known_groups_and_expects_the_rest():
    # nothing in: the round's fixed ranges (2 steps x 3)
    assert planning_horizon(5, steps=2, per_step=3, limit=9, degenerate=flags(5, [])) == 11
    # orders 5 and 7 came back degenerate: two more to issue
    assert planning_horizon(5, 2, 3, 9, flags(5, [D, S, D])) == 13
    # half of what comes back is expected degenerate: twice the orders
    assert planning_horizon(0, 1, 3, 9, flags(0, []), expected_degenerate=0.5) == 6
    # never past the limit of each step
    assert planning_horizon(0, 2, 2, 3, flags(0, [D] * 6)) == 6


# ------------------------------------------------------------------------------------ the book and buffer


def make_group(order, scores, version=None) -> RolloutGroup:
    samples = [Sample([3, 4], [-0.5, -0.5], "stop", reward=r) for r in scores]
    return RolloutGroup(Prompt(f"p{order.prompt_index}", [1, 2]), samples,
                        order.version if version is None else version, 1.0, 1.0, order_index=order.index)


def scores_of(index: int) -> list[float]:
    """A fixed function of the order index: every third group degenerate (all 0), the rest mixed."""
    return [0.0, 0.0] if index % 3 == 0 else [0.0, 1.0]


def serve_round(assembler: StepAssembler, steps: range, version: int, rng: random.Random) -> list:
    """Deal the book's open orders, answer them in a random order (as a fleet would), take each step."""
    taken = []
    for step in steps:
        assembler.plan(step, version)
        while (result := assembler.take(step)) is None:
            orders = assembler.book.unassigned()
            assert orders, f"step {step} waits but the book issues nothing"
            assembler.book.assign([0])
            rng.shuffle(orders)
            for order in orders[: max(1, len(orders) // 2)]:  # part of them now, the rest on the next turn
                assembler.received(make_group(order, scores_of(order.index)))
            assembler.book.release(0)  # the unanswered ones are dealt again
            assembler.plan(step, version)
        taken.append(result)
    return taken


def test_the_book_over_issues_and_every_step_takes_P_groups_of_its_version_in_index_order():
    per_step, limit = 4, 12
    book = OrderBook(PromptSampler(50, seed=0), run_seed=7, prompts_per_step=per_step, sync_every=2,
                     dynamic_limit=limit)
    buffer = VersionedBuffer(LagSchedule(sync_every=2))
    assembler = StepAssembler(book, buffer)
    rng = random.Random(0)
    first_round = serve_round(assembler, range(1, 3), version=0, rng=rng)
    # Orders issued beyond step 2's end are of version 0 (some answered, some not): the push drops them
    # (buffer and engines), the book re-issues them for version 1, same index and seed.
    beyond = range(12, book.planned_until)
    assert len(beyond) > 0 and any(i in buffer.groups for i in beyond)
    buffer.advance(1)
    assembler.plan(3, 1)
    reissued = [book.open[("train", i)] for i in beyond]
    assert all(o.version == 1 and o.seed == order_seed(7, o.index) for o in reissued)
    assert not any(o.key in book.holder for o in reissued)  # dealt again
    second_round = serve_round(assembler, range(3, 5), version=1, rng=rng)

    positions, start = [], 0
    for (groups, end), version in zip(first_round + second_round, (0, 0, 1, 1)):
        assert len(groups) == per_step
        assert all(g.policy_version == version for g in groups)
        assert all(len(set(g.rewards)) > 1 for g in groups)  # no degenerate group trained
        indices = [g.order_index for g in groups]
        # the first P non-degenerate indices from the step's start, the next step starting after the last
        assert indices == [i for i in range(start, end) if i % 3][:per_step] and end == indices[-1] + 1
        positions.append(end)
        start = end
    assert positions == [6, 12, 18, 24]
    assert assembler.tally.dropped_total == 8 and assembler.tally.capped_total == 0


def test_which_groups_a_step_takes_does_not_depend_on_arrival_order():
    def run(seed):
        book = OrderBook(PromptSampler(50, seed=0), 7, 3, sync_every=3, dynamic_limit=9)
        assembler = StepAssembler(book, VersionedBuffer(LagSchedule(3)))
        return [([g.order_index for g in groups], end)
                for groups, end in serve_round(assembler, range(1, 4), 0, random.Random(seed))]

    assert run(1) == run(2) == run(3)


def test_without_dynamic_sampling_a_step_takes_its_fixed_range():
    book = OrderBook(PromptSampler(50, seed=0), 7, 4, sync_every=2, start_step=3, start_position=8)
    assembler = StepAssembler(book, VersionedBuffer(LagSchedule(2), current_version=1))
    ((groups, end),) = serve_round(assembler, range(3, 4), 1, random.Random(0))
    assert [g.order_index for g in groups] == [8, 9, 10, 11] and end == 12  # degenerate 9 kept
    assert assembler.tally.metrics()["rollout/degenerate_groups_dropped"] == 0


# ------------------------------------------------------------------------------------ offline


def test_offline_steps_skip_degenerate_groups_in_file_order(tmp_path):
    cfg = load_config(None, ("fleet.group_size=2", "fleet.prompts_per_step=2", "fleet.dynamic_sampling=true",
                             "fleet.dynamic_sampling_max_orders=2", "lag.mode=offline",
                             f"lag.offline_dataset={tmp_path / 'd.jsonl'}"), check_hardware=False)
    book = OrderBook(PromptSampler(50, seed=0), 0, 2, sync_every=100)
    book.plan_round(1, 0)
    pattern = [D, S, S, D, D, D, D, S, S, S]  # orders 0..9
    groups = [make_group(order, [1.0, 1.0] if pattern[i] else [0.0, 1.0])
              for i, order in enumerate(sorted(book.open.values(), key=lambda o: o.index)[:10])]
    write_groups(cfg.lag.offline_dataset, groups)
    source = DatasetRollouts(cfg)
    steps = [source.next_message(step, 0) for step in (1, 2, 3)]
    # step 2 looks at 3..6 (its limit, 2 x 2), all degenerate: capped, it trains on the first two of them
    assert [[g.order_index for g in m["groups"]] for m in steps] == [[1, 2], [3, 4], [7, 8]]
    assert [m["position"] for m in steps] == [3, 7, 9]
    assert source.counters()["rollout/dynamic_sampling_capped_total"] == 1
    assert source.counters()["rollout/degenerate_groups_dropped"] == 0  # step 3: 7, 8 at once
    resumed = DatasetRollouts(cfg, start_step=3, start_position=7)  # a checkpoint's sampler position
    assert [g.order_index for g in resumed.next_message(3, 0)["groups"]] == [7, 8]


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides,needle", [
    (("fleet.dynamic_sampling=true", "fleet.prompts_per_step=20", "data.num_train_prompts=10"),
     "fleet.prompts_per_step=20 must be <= data.num_train_prompts=10"),
    (("fleet.dynamic_sampling_max_orders=0.5",), "fleet.dynamic_sampling_max_orders=0.5 must be >= 1"),
])
def test_bad_dynamic_sampling_settings_are_one_line_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, check_hardware=False)
    assert needle in str(err.value) and len(err.value.errors) == 1


def test_dynamic_sampling_needs_as_many_prompts_as_a_step_takes():
    cfg = load_config(None, ("fleet.dynamic_sampling=true", "fleet.prompts_per_step=8"), check_hardware=False)
    with pytest.raises(ConfigError, match=r"fleet.prompts_per_step=8 is larger than the 5 training prompts"):
        check_prompt_count(cfg, 5)
    check_prompt_count(cfg, 8)
