"""Where optimizer step s gets its groups, as the coordinator (global rank 0) sees it.

    FleetRollouts    the fleet samples work orders (rollout/orders.py) with the current version; restarted
                     engines are re-synced before any of their groups count; pushed versions are evaluated
                     (eval.every) through the same book
    DatasetRollouts  lag.mode=offline: the groups a frozen generator wrote with `oapl generate`, in order;
                     no fleet, no pushes

Both answer `next_message(step, version)` with one of
    {"groups": [...], "position": n}        step s's groups, in work-order order, and the sampler position
                                            after it (the next step's first order; a checkpoint stores it)
    {"resync": [engine ids], "receivers": n} restarted engines to bring to `version` first (fleet only)
    {"stop": True}                          a stop signal arrived while waiting
which the coordinator (train.Coordinator) publishes on the control channel, so the other ranks see the
same answer and join the same pushes, however long the answer took.

With fleet.dynamic_sampling both take, from the step's start position, the first P groups whose raw scores
differ (rollout/orders.fill_step); the fleet over-issues orders of the current version to refill the step.
"""

from __future__ import annotations

import logging
import time

from megatron_oapl import metrics as M
from megatron_oapl.evaluation import EvalRound, check_eval_sets, eval_rounds, record_round, report_metrics
from megatron_oapl.rollout.dataset import RolloutDataset
from megatron_oapl.rollout.fleet import Fleet, FleetStopped
from megatron_oapl.rollout.orders import (
    OrderBook,
    PromptSampler,
    StepFill,
    all_equal,
    check_prompt_count,
    dynamic_sampling_limit,
    fill_step,
    step_orders,
)
from megatron_oapl.rollout.types import RolloutGroup
from megatron_oapl.schedule import LagSchedule, SamplingTally, StepAssembler, VersionedBuffer
from megatron_oapl.weights.transport import Rendezvous, WeightStoreServer

log = logging.getLogger(__name__)


def dynamic_limit(cfg) -> int | None:
    """Orders one step may look at with fleet.dynamic_sampling (None: off, fixed ranges)."""
    fleet = cfg.fleet
    return dynamic_sampling_limit(fleet.prompts_per_step, fleet.dynamic_sampling_max_orders) if (
        fleet.dynamic_sampling) else None


class DatasetRollouts:
    """Step s trains on orders `step_orders(s)` of an offline dataset (reused in order past its end), read
    from the file when the step asks for them: no rank holds the whole round. With fleet.dynamic_sampling
    a step skips degenerate groups in file order (the same rule and limit as the fleet's)."""

    pushes = False
    store_port = 0
    last_pass_at_1 = None

    def __init__(self, cfg, start_step: int = 1, start_position: int = 0):
        self.per_step, self.start_step, self.start_position = cfg.fleet.prompts_per_step, start_step, start_position
        self.limit = dynamic_limit(cfg)
        self.position, self.tally = start_position, SamplingTally(self.per_step)  # the next step's first order
        self.data = RolloutDataset(cfg.lag.offline_dataset, cfg.fleet)
        steps = ("steps skip the all-equal groups (fleet.dynamic_sampling)" if self.limit else
                 f"{len(self.data) // self.per_step} steps")
        log.info("offline round: %d groups from %s (%s; later steps reuse them in the same order), no weight "
                 "pushes", len(self.data), cfg.lag.offline_dataset, steps)

    def next_message(self, step: int | None, version: int) -> dict:
        if step is None:
            return {"groups": []}
        if self.limit is None:
            indices = step_orders(step, self.per_step, self.start_step, self.start_position)
            fill = StepFill(indices.start, indices.stop, tuple(indices), capped=False)
            read = {i: self.data.group(i % len(self.data)) for i in indices}
        else:
            read: dict = {}

            def degenerate(i: int) -> bool:
                read[i] = self.data.group(i % len(self.data))
                return all_equal(read[i].rewards)

            fill = fill_step(self.position, self.per_step, self.limit, degenerate)
        self.position = fill.end
        self.tally.add(fill)
        return {"groups": [read[i] for i in fill.taken], "position": fill.end}

    def start_eval(self, version: int, step: int) -> None:
        pass  # the generator is frozen: `oapl train`'s before/after report evaluates the trained policy

    def counters(self) -> dict[str, float]:
        return self.tally.metrics()

    def close(self) -> None:
        pass


class FleetRollouts:
    """The fleet behind the lag schedule: plans and deals work orders, admits groups of the current
    version into the buffer (by order index, never by arrival), tallies evaluations."""

    pushes = True
    STALL_WARNING_S = 10.0  # first "waiting for rollouts" warning; then after 4x, 16x, ... as long

    def __init__(self, cfg, cfg_dict: dict, schedule: LagSchedule, writer: M.MetricsWriter, start_step: int = 1,
                 start_position: int = 0, stop=None):
        from megatron_oapl.data.prompts import load_prompts

        self.cfg, self.schedule, self.writer, self.stop = cfg, schedule, writer, stop
        num_prompts = len(load_prompts(cfg.data, "train"))
        check_prompt_count(cfg, num_prompts)
        sampler = PromptSampler(num_prompts, cfg.data.seed)
        self.orders = OrderBook(sampler, cfg.seed, cfg.fleet.prompts_per_step, schedule.sync_every,
                                start_step, start_position, dynamic_limit(cfg))
        self.buffer = VersionedBuffer(schedule)
        self.steps = StepAssembler(self.orders, self.buffer)
        # eval.every > 0: the fleet evaluates pushed versions (one eval order per prompt of each eval set).
        # The fleet evaluates the initial and the final weights (oapl train's before / after report) and,
        # with eval.every > 0, pushed versions in between: one eval order per prompt of each eval set.
        self.eval_counts = check_eval_sets(cfg)  # split -> prompts
        self.eval_rounds: dict[str, EvalRound] = {}  # the pending evaluation, by split
        self.last_pass_at_1: float | None = None
        self.resyncs = 0
        self.reward_errors = self.reward_timeouts = 0  # over every group received (train and eval)
        sync = cfg.fleet.weight_sync
        self.store = WeightStoreServer(sync.master_addr, sync.master_port, sync.timeout_s)
        self.store_port = self.store.port
        self.fleet = Fleet(cfg, cfg_dict, cfg.model.hf_path)
        self.fleet.should_stop = lambda: bool(stop)
        self.waiting_for = start_step  # the step whose rollouts are awaited: where a restart is logged
        self.fleet.on_restart = self._log_restart
        try:
            if cfg.fleet.external:  # fleet nodes elsewhere find the channels and the weight store here
                self.fleet.publish((sync.master_addr, self.store.port))
            self.fleet.wait_ready(list(self.fleet.engines), timeout_s=cfg.fleet.start_timeout_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ rollouts

    def next_message(self, step: int | None, version: int) -> dict:
        """The groups of `step` (None: none), engines to re-sync first, or `stop` when a stop signal arrived
        meanwhile (a preempted job's fleet may be going down with it: waiting on it, or restarting its
        engines, would outlast the grace period before SIGKILL). Before the step that ends a lag round, and
        with step None, the pending evaluation must be complete too: the next push replaces the weights it
        samples (its orders are ranked before that step's, so this waits only for stragglers)."""
        if step is not None:
            self.steps.plan(step, version)
            self.waiting_for = step
        finish_eval = step is None or self.schedule.sync_after(step)
        start, warn_at = time.monotonic(), self.STALL_WARNING_S
        while True:
            if self.stop:
                return {"stop": True}
            if time.monotonic() - start > warn_at:  # say why the learner is idle (an operator's first question)
                self._warn_stalled(step, version, time.monotonic() - start)
                warn_at *= 4
            try:
                stale, arrived = self.fleet.serve(self.orders, version)
            except FleetStopped:  # while a restarted engine was starting
                return {"stop": True}
            if stale:  # restarted engines (version 0 weights): re-synced before they get orders
                self.resyncs += len(stale)
                return {"resync": stale, "receivers": self.fleet.weight_ranks(stale)}
            for group in arrived:
                self._received(group)
            if arrived and step is not None and self.orders.dynamic_limit is not None:
                self.steps.plan(step, version)  # degenerate groups came in: top the book up
            if finish_eval and self.eval_rounds:
                continue
            if step is None:
                return {"groups": []}
            taken = self.steps.take(step)
            if taken is not None:
                groups, position = taken
                return {"groups": groups, "position": position}

    def _log_restart(self, total: int) -> None:
        # When it happens: an engine that dies while starting, or before the run gives up, still shows.
        self.writer.scalars({M.ENGINE_RESTARTS: total}, self.waiting_for)
        self.writer.flush()

    def _warn_stalled(self, step: int | None, version: int, waited: float) -> None:
        have, wanted = (0, 0) if step is None else self.steps.progress(step)
        evals = "" if not self.eval_rounds else (
            f", evaluation of version {next(iter(self.eval_rounds.values())).version} pending: "
            + ", ".join(f"{r.name} {len(r.correct)}/{r.num_prompts}" for r in self.eval_rounds.values()))
        log.warning("waiting %.0f s for rollouts of step %s (version %d): %d of %d groups in%s; engines alive: %s",
                    waited, step, version, have, wanted, evals, self.fleet.ready_engines())

    def _received(self, group: RolloutGroup) -> None:
        self.reward_errors += group.reward_errors
        self.reward_timeouts += group.reward_timeouts
        if group.split != "train":
            self._eval_group(group)
        else:
            self.steps.received(group)

    # ------------------------------------------------------------------------------------ evaluation

    def start_eval(self, version: int, step: int) -> None:
        """Have the fleet evaluate `version` (pushed after `step`; 0: the initial weights) on every eval set:
        its orders are dealt now, ranked between the coming round's training orders."""
        if self.eval_counts:
            for split, n in self.eval_counts.items():
                self.orders.plan_eval(version, split, n, after_step=step)
            self.eval_rounds = eval_rounds(self.cfg, self.eval_counts, version, step)

    def _eval_group(self, group: RolloutGroup) -> None:
        pending = self.eval_rounds.get(group.split)
        if pending is None or group.policy_version != pending.version:
            raise RuntimeError(f"{group.split} group of version {group.policy_version} for prompt "
                               f"{group.order_index}, but the pending evaluation is {pending}: an eval order "
                               "outlived its version")
        if self.orders.delivered((group.split, group.order_index)):
            pending.add(group)
        if pending.done:  # logged at the step of its push, whatever set finishes first
            report = record_round(self.cfg.run_dir, pending)
            self.writer.scalars(report_metrics(report, pending.name), pending.step)
            n = report.num_samples
            log.info("evaluation of version %d (step %d) on %s: pass@1 %.3f ± %.3f, pass@%d %.3f, avg@%d %.3f",
                     pending.version, pending.step, pending.name, report.pass_at_k[1], report.stderr[1], n,
                     report.pass_at_k[n], n, report.avg_at_n)
            del self.eval_rounds[group.split]
            if group.split == next(iter(self.eval_counts)):  # the first set feeds the progress line
                self.last_pass_at_1 = report.pass_at_k[1]

    # ------------------------------------------------------------------------------------ pushes

    def sync_targets(self) -> tuple[list[int], int]:
        """The engines of the next push and their receiving ranks."""
        engines = self.fleet.ready_engines()
        return engines, self.fleet.weight_ranks(engines)

    def request_sync(self, engine_ids: list[int], version: int, rdvs: list[Rendezvous]) -> None:
        self.fleet.request_sync(engine_ids, version, [r.to_dict() for r in rdvs])

    def peer_check(self, engine_ids: list[int]):
        return lambda: self.fleet.dead_among(engine_ids)

    def finish_sync(self, engine_ids: list[int], version: int) -> None:
        """Wait for the engines' replies, then drop groups of older versions."""
        replies = self.fleet.wait_synced(engine_ids, version, self.cfg.fleet.weight_sync.timeout_s)
        refused = {i: r.error for i, r in replies.items() if r.error}
        if refused:
            log.error("engines refused version %d: %s", version, refused)
        self.fleet.count_refusals(replies)  # an engine that refuses fleet.max_refused_syncs in a row is restarted
        self.buffer.advance(version)

    def counters(self) -> dict[str, float]:
        """Run totals for the step's metrics (and what dynamic sampling looked at for the step)."""
        return {M.DROPPED_STALE: self.buffer.dropped_stale, M.DUPLICATE_GROUPS: self.buffer.duplicates,
                M.ENGINE_RESTARTS: self.fleet.restarts_total, M.ENGINE_RESYNCS: self.resyncs,
                M.REWARD_ERRORS: self.reward_errors, M.REWARD_TIMEOUTS: self.reward_timeouts,
                **self.steps.tally.metrics()}

    def close(self) -> None:
        if getattr(self, "fleet", None) is not None:
            self.fleet.close()
