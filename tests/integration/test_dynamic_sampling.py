"""fleet.dynamic_sampling end to end on real processes (tiny model, TP=2 learners, one light engine): every
step trains on prompts_per_step groups with differing raw scores, all of the step's policy version, while
all-equal groups are dropped and counted; with fleet.reproducible=true a second run takes the same orders.
The same runs shape scores with the overlong penalty and mask truncated samples, read back from
TensorBoard."""

from __future__ import annotations

import itertools
import json

import pytest

from megatron_oapl import metrics as M
from tests.integration.test_train_e2e import finish, oapl_train, scalars

STEPS, PER_STEP = 3, 4
# Group size 4 on the barely warm-started tiny model: most groups score all 0, so refills are certain; a
# limit of 20 x P orders keeps a capped step practically impossible. L = 2: step 3 is sampled by the pushed
# version 1, after the push dropped what version 0 had sampled beyond step 2.
ARGS = (f"optim.train_steps={STEPS}", "lag.sync_every=2", "fleet.group_size=4", "fleet.dynamic_sampling=true",
        "fleet.dynamic_sampling_max_orders=20", "fleet.reproducible=true", "eval.every=0",
        "rewards.overlong_buffer_tokens=4", "algo.mask_truncated=true", "checkpoint.save_every=1",
        "checkpoint.keep_last=3")


def sampler_positions(run_dir) -> list[int]:
    return [json.loads((run_dir / "checkpoints" / f"step_{s}" / "meta.json").read_text())["state"]["sampler_position"]
            for s in range(1, STEPS + 1)]


def test_dynamic_sampling_refills_every_step_and_is_reproducible(tiny_model, tmp_path):
    runs = [tmp_path / "first", tmp_path / "second"]
    for run_dir in runs:
        finish(oapl_train(tiny_model, run_dir, *ARGS), 600)
    first, second = (scalars(r) for r in runs)
    steps = range(1, STEPS + 1)

    assert all(first[M.GROUPS_TRAINED][s] == PER_STEP for s in steps)  # P groups with a signal, every step
    assert sum(first[M.DEGENERATE_DROPPED][s] for s in steps) > 0
    assert all(first[M.EXTRA_ORDERS][s] == first[M.DEGENERATE_DROPPED][s] for s in steps)  # never capped
    assert first[M.DYNAMIC_SAMPLING_CAPPED][STEPS] == 0
    assert [first[M.POLICY_VERSION][s] for s in steps] == [0, 0, 1]
    assert all(first[M.GROUP_LAG_MAX][s] == 0 for s in steps)  # every group of the step's version
    # The sampler position a checkpoint stores is where each step's refill stopped.
    positions = sampler_positions(runs[0])
    assert positions == list(itertools.accumulate(PER_STEP + int(first[M.EXTRA_ORDERS][s]) for s in steps))

    # Reproducible: the same orders looked at, the same groups trained, the same losses.
    assert sampler_positions(runs[1]) == positions
    for tag in (M.DEGENERATE_DROPPED, M.REWARD_MEAN, M.SEQUENCE_ENTROPY, M.LOSS):
        assert [second[tag][s] for s in steps] == [first[tag][s] for s in steps], tag

    # algo.mask_truncated: exactly the truncated samples leave the loss; each of them (n = max_new_tokens)
    # carries the full overlong penalty, and shorter ones in the buffer may too.
    for s in steps:
        assert first[M.LOSS_PREFIX + "kept_seq_frac"][s] == pytest.approx(1 - first[M.TRUNCATED_FRACTION][s], abs=1e-6)
        assert first[M.OVERLONG_PENALIZED_FRAC][s] >= first[M.TRUNCATED_FRACTION][s]
