"""Offline rollout datasets (lag.mode=offline): groups the fleet sampled once with a frozen policy, stored as
JSONL and replayed by the learner for a whole round — OAPL's offline setting, where the generator stays
fixed for hundreds of optimizer steps. `oapl generate` writes one; a run with lag.mode=offline reads it.

One line per group, answering one work order (rollout/orders.py, so step s trains on the same prompts an
online run would); lines may come in any order, each order once, and `order_index` comes first:
    {"order_index", "prompt": {"prompt_id", "token_ids", "text", "answer", "metadata"},
     "samples": [{"token_ids", "logprobs", "finish_reason", "text", "reward"}, ...],
     "policy_version", "temperature", "top_p", "engine_id", "split", "generate_seconds", ...}
Token ids and the engine's per-token log-probs are stored as sampled, never re-tokenised.

A round can be tens of GB, so nothing holds it whole: `RolloutDataset` indexes the byte offset of each
order's line (reading only the `order_index` prefix of each line) and parses a line when a step asks for
it; `oapl generate` appends each group as it arrives and a rerun of the same command samples only the
orders not on disk yet. With fleet.dynamic_sampling it samples past steps x prompts_per_step until every
step has its groups with differing raw scores (or its limit), as training will skip the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path

from megatron_oapl.rollout.orders import all_equal
from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample

log = logging.getLogger(__name__)

_ORDER_PREFIX = re.compile(rb'\{"order_index": (\d+)[,}]')


def group_line(group: RolloutGroup) -> str:
    """One dataset line (with its newline), `order_index` first so that an index reads only the prefix."""
    return json.dumps({"order_index": group.order_index, **dataclasses.asdict(group)}) + "\n"


def write_groups(path: str | Path, groups: list[RolloutGroup]) -> Path:
    """Write `groups` (group i answers order i) as JSONL, atomically: a crash leaves no partial file."""
    for i, group in enumerate(groups):
        if group.order_index != i:
            raise ValueError(f"group {i} answers order {group.order_index}: line i must hold order i")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for group in groups:
            f.write(group_line(group))
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------
# Reading: an index of line offsets, lines parsed on demand
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LineIndex:
    """Where each order's line starts. `complete_bytes` ends the last line that has its newline; a tail
    after it (`torn`) is a line cut short by a kill."""

    lines: dict[int, tuple[int, int]]  # order -> (byte offset, line number)
    complete_bytes: int
    torn: bool


def index_lines(path: Path) -> LineIndex:
    """Scan `path` once, keeping each line's offset under its order (from the line's prefix; lines written
    before the prefix came first are json-parsed for it). Two lines for one order are an error."""
    lines: dict[int, tuple[int, int]] = {}
    offset, line_no = 0, 0
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return LineIndex(lines, offset, torn=True)
            line_no += 1
            order = _order_of(line, f"{path}:{line_no}")
            if order in lines:
                raise ValueError(f"{path}:{line_no}: order {order} is also on line {lines[order][1]}: "
                                 "each order must appear once")
            lines[order] = (offset, line_no)
            offset += len(line)
    return LineIndex(lines, offset, torn=False)


def _order_of(line: bytes, where: str) -> int:
    match = _ORDER_PREFIX.match(line)
    if match:
        return int(match.group(1))
    try:
        return int(json.loads(line)["order_index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a rollout group ({err})") from err


def parse_group(line: bytes | str, where: str, fleet_cfg, order: int | None = None,
                vocab_size: int | None = None) -> RolloutGroup:
    """One line as a group, checked field by field (`check_group`) and against the run's sampling settings
    (`fleet_cfg`): the learner computes log-probs at fleet.temperature and OAPL's V_hat needs groups of
    fleet.group_size."""
    try:
        raw = json.loads(line)
        samples = [Sample(**s) for s in raw.pop("samples")]
        group = RolloutGroup(prompt=Prompt(**raw.pop("prompt")), samples=samples, **raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{where}: not a rollout group ({err})") from err
    expected = {"temperature": fleet_cfg.temperature, "top_p": fleet_cfg.top_p, "group size": fleet_cfg.group_size}
    found = {"temperature": group.temperature, "top_p": group.top_p, "group size": len(group.samples)}
    if order is not None:
        expected["order_index"], found["order_index"] = order, group.order_index
    for key, want in expected.items():
        if found[key] != want:
            field = "the line's place in the index" if key == "order_index" else f"fleet.{key.replace(' ', '_')}"
            raise ValueError(f"{where}: {key} {found[key]} != {want} ({field}): the dataset was not "
                             "sampled with this run's settings")
    check_group(group, where, vocab_size)
    return group


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_token_ids(ids, field: str, where: str, vocab_size: int | None) -> None:
    allowed = f"ints in [0, {vocab_size})" if vocab_size else "non-negative ints"
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"{where}: {field} must be a non-empty list of token ids ({allowed}), got {ids!r:.60}")
    for i, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or token < 0 or (vocab_size and token >= vocab_size):
            raise ValueError(f"{where}: {field}[{i}] is {token!r:.40} ({type(token).__name__}): token ids must be "
                             f"{allowed}" + (" (the vocabulary of model.hf_path)" if vocab_size else ""))


def check_group(group: RolloutGroup, where: str, vocab_size: int | None = None) -> None:
    """What the learner relies on, field by field (valid JSON of the wrong type would otherwise fail deep in
    a rank with no file:line): token ids are ints (in the vocabulary, when `vocab_size` is given), one
    finite log-prob per completion token, rewards and the sampling settings are numbers."""
    for name in ("temperature", "top_p"):
        if not _is_number(getattr(group, name)):
            raise ValueError(f"{where}: {name} must be a number, got {getattr(group, name)!r:.40}")
    if not isinstance(group.policy_version, int) or isinstance(group.policy_version, bool):
        raise ValueError(f"{where}: policy_version must be an int, got {group.policy_version!r:.40}")
    _check_token_ids(group.prompt.token_ids, "prompt.token_ids", where, vocab_size)
    for i, sample in enumerate(group.samples):
        field = f"samples[{i}]"
        _check_token_ids(sample.token_ids, f"{field}.token_ids", where, vocab_size)
        logprobs = sample.logprobs
        if not isinstance(logprobs, list) or len(logprobs) != len(sample.token_ids):
            got = f"{len(logprobs)} entries" if isinstance(logprobs, list) else f"{logprobs!r:.40}"
            raise ValueError(f"{where}: {field}.logprobs must be a list of one log-prob per token "
                             f"({len(sample.token_ids)} tokens), got {got}")
        bad = next((j for j, x in enumerate(logprobs) if not _is_number(x)), None)
        if bad is not None:
            raise ValueError(f"{where}: {field}.logprobs[{bad}] is {logprobs[bad]!r:.40}: log-probs must be finite numbers")
        if not _is_number(sample.reward):
            raise ValueError(f"{where}: {field}.reward must be a finite number, got {sample.reward!r:.40}")


class RolloutDataset:
    """An offline dataset, streamed: `group(i)` reads and checks the line of order i. Opening it indexes the
    file (orders 0..n-1, each once, no torn last line) and checks its first line against the run's
    sampling settings; every other line is checked when it is read, or all of them by `check_every_line`
    (the pre-flight). `vocab_size`: token ids must lie below it (None: not checked)."""

    def __init__(self, path: str | Path, fleet_cfg, vocab_size: int | None = None):
        self.path, self.fleet_cfg, self.vocab_size = Path(path), fleet_cfg, vocab_size
        if not self.path.is_file():
            raise FileNotFoundError(f"lag.offline_dataset={str(self.path)!r} does not exist (write one with "
                                    "`oapl generate`)")
        index = index_lines(self.path)
        if index.torn:
            raise ValueError(f"{self.path}: the last line is incomplete (an interrupted `oapl generate`: run the "
                             "same command again to finish the dataset)")
        if not index.lines:
            raise ValueError(f"lag.offline_dataset={str(self.path)!r} holds no groups")
        missing = sorted(set(range(len(index.lines))) - set(index.lines))
        if missing:
            raise ValueError(f"{self.path}: orders {_ranges(missing)} are missing (it holds {len(index.lines)} "
                             "lines; an unfinished `oapl generate`: run the same command again)")
        self._lines = index.lines
        first = min(self._lines.values(), key=lambda offset_line: offset_line[1])
        self._read(first[0], first[1], order=None)  # the header check: settings of the whole file

    def __len__(self) -> int:
        return len(self._lines)

    def group(self, order: int) -> RolloutGroup:
        offset, line_no = self._lines[order]
        return self._read(offset, line_no, order)

    def _read(self, offset: int, line_no: int, order: int | None) -> RolloutGroup:
        with self.path.open("rb") as f:
            f.seek(offset)
            line = f.readline()
        return parse_group(line, f"{self.path}:{line_no}", self.fleet_cfg, order, self.vocab_size)

    def check_every_line(self) -> None:
        """Parse and check every line, one at a time (a dataset can be far larger than memory): the first
        bad one raises ValueError naming file:line and the field. Costs one read of the file."""
        orders = {line_no: order for order, (_, line_no) in self._lines.items()}
        with self.path.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                parse_group(line, f"{self.path}:{line_no}", self.fleet_cfg, orders[line_no], self.vocab_size)


def read_groups(path: str | Path, fleet_cfg) -> list[RolloutGroup]:
    """Every group of a (small) offline dataset, by order."""
    data = RolloutDataset(path, fleet_cfg)
    return [data.group(i) for i in range(len(data))]


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most 5 runs, then '...')."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = [f"{a}-{b}" if b > a else str(a) for a, b in runs[:5]]
    return ", ".join(text) + (", ..." if len(runs) > 5 else "")


# --------------------------------------------------------------------------------------------------
# Writing: `oapl generate`
# --------------------------------------------------------------------------------------------------


class GroupAppender:
    """Appends one line per group as it arrives (a kill loses at most the line being written, and the
    operating system keeps what was written); fsyncs every `every_groups` groups or `every_s` seconds so
    that a node crash loses little."""

    def __init__(self, path: Path, every_groups: int = 64, every_s: float = 30.0):
        self.file = path.open("ab")
        self.every_groups, self.every_s = every_groups, every_s
        self.unsynced, self.synced_at = 0, time.monotonic()

    def append(self, group: RolloutGroup) -> None:
        self.file.write(group_line(group).encode())  # one write per line: a kill tears at most the last
        self.file.flush()
        self.unsynced += 1
        if self.unsynced >= self.every_groups or time.monotonic() - self.synced_at >= self.every_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.unsynced, self.synced_at = 0, time.monotonic()

    def close(self) -> None:
        self.sync()
        self.file.close()


def orders_on_disk(path: Path, fleet_cfg) -> set[int]:
    """The orders an earlier `oapl generate` already wrote to `path` (none if it does not exist). A torn last
    line (a kill during its write) is cut off; a file sampled with other settings is refused."""
    if not path.is_file():
        return set()
    index = index_lines(path)
    if index.torn:
        log.warning("%s: dropping the incomplete last line (the previous run was killed while writing it)", path)
        with path.open("r+b") as f:
            f.truncate(index.complete_bytes)
    if index.lines:
        offset, line_no = min(index.lines.values(), key=lambda offset_line: offset_line[1])
        with path.open("rb") as f:
            f.seek(offset)
            parse_group(f.readline(), f"{path}:{line_no}", fleet_cfg)
    return set(index.lines)


def generate(cfg, cfg_dict: dict, out: str | Path, steps: int, progress: bool = True) -> Path:
    """Sample the work orders of steps 1..`steps` with the fleet on model.hf_path (version 0), appending each
    group to `out` as it arrives. Orders already in `out` (an interrupted run of the same command) are not
    sampled again. A dead engine is restarted and its open orders are dealt again, as in training; no
    weights are pushed."""
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.rollout.fleet import Fleet
    from megatron_oapl.rollout.orders import OrderBook, PromptSampler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.fleet.dynamic_sampling:
        return _generate_dynamic(cfg, cfg_dict, out, steps, progress)
    wanted = steps * cfg.fleet.prompts_per_step
    done = {i for i in orders_on_disk(out, cfg.fleet) if i < wanted}
    if done:
        log.info("%s already holds %d of the %d groups: sampling the other %d", out, len(done), wanted,
                 wanted - len(done))
    if len(done) == wanted:
        return out
    sampler = PromptSampler(len(load_prompts(cfg.data, "train")), cfg.data.seed)
    book = OrderBook(sampler, cfg.seed, cfg.fleet.prompts_per_step, sync_every=steps)
    book.plan_round(1, version=0)  # one round: every order of the dataset
    for index in done:
        book.delivered(("train", index))  # on disk already: never dealt
    fleet = Fleet(cfg, cfg_dict, cfg.model.hf_path)
    appender = None
    try:
        fleet.wait_ready(list(fleet.engines), timeout_s=cfg.fleet.start_timeout_s)
        appender = GroupAppender(out)
        _serve_all(fleet, book, appender, _bar(progress, wanted, len(done)))
    finally:
        if appender:
            appender.close()
        fleet.close()
    return out


def _serve_all(fleet, book, appender: GroupAppender, bar, on_group=None) -> None:
    """Deal every open order of `book` and append each group as it arrives (and pass it to `on_group`)."""
    while book.open:
        stale, arrived = fleet.serve(book, version=0)
        if stale:  # every engine, a restarted one too, holds the initial weights
            raise RuntimeError(f"engines {stale} hold a version other than 0 while generating")
        for group in arrived:
            if book.delivered(("train", group.order_index)):
                appender.append(group)
                if on_group:
                    on_group(group)
                if bar:
                    bar.update(1)
    if bar and on_group is None:
        bar.close()


def degenerate_on_disk(path: Path, fleet_cfg) -> dict[int, bool]:
    """Order -> whether its group's raw scores are all equal, for every group already in `path` (a torn last
    line is cut off first, as `orders_on_disk` does)."""
    orders_on_disk(path, fleet_cfg)
    if not path.is_file():
        return {}
    flags = {}
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            group = parse_group(line, f"{path}:{line_no}", fleet_cfg)
            flags[group.order_index] = all_equal(group.rewards)
    return flags


def _generate_dynamic(cfg, cfg_dict: dict, out: Path, steps: int, progress: bool) -> Path:
    """fleet.dynamic_sampling: sample orders 0, 1, ... until each of the `steps` steps has found its
    prompts_per_step groups with differing raw scores (or reached the limit), as training will look for them
    (rollout/orders.fill_step); every group sampled is written, so the file holds orders 0..n-1."""
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.rollout.fleet import Fleet
    from megatron_oapl.rollout.orders import (
        OrderBook,
        PromptSampler,
        check_prompt_count,
        dynamic_sampling_limit,
    )

    per_step = cfg.fleet.prompts_per_step
    known = degenerate_on_disk(out, cfg.fleet)  # order -> all-equal raw scores
    if known:
        log.info("%s already holds %d groups: sampling only what the %d steps still need", out, len(known), steps)
    num_prompts = len(load_prompts(cfg.data, "train"))
    check_prompt_count(cfg, num_prompts)
    book = OrderBook(PromptSampler(num_prompts, cfg.data.seed), cfg.seed, per_step, sync_every=steps,
                     dynamic_limit=dynamic_sampling_limit(per_step, cfg.fleet.dynamic_sampling_max_orders))

    def plan() -> None:  # orders up to what the steps are expected to look at, given what is known
        rate = sum(known.values()) / len(known) if known else 0.0
        book.plan_round(1, 0, known.get, rate)
        for key in [k for k in book.open if k[1] in known]:
            book.delivered(key)  # on disk already: never dealt

    plan()
    if not book.open:
        return out
    fleet, appender = Fleet(cfg, cfg_dict, cfg.model.hf_path), None
    bar = _bar(progress, book.planned_until, len(known))
    try:
        fleet.wait_ready(list(fleet.engines), timeout_s=cfg.fleet.start_timeout_s)
        appender = GroupAppender(out)
        while book.open:  # each pass learns which groups were degenerate; the next tops the orders up
            _serve_all(fleet, book, appender, bar,
                       on_group=lambda g: known.__setitem__(g.order_index, all_equal(g.rewards)))
            plan()
            if bar:
                bar.total = book.planned_until
    finally:
        if bar:
            bar.close()
        if appender:
            appender.close()
        fleet.close()
    return out


def _bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="generate", unit="group")
