"""`oapl study STUDY.yaml`: a grid of `oapl train` runs from one YAML, run N at a time, resumable, then a
report (megatron_oapl/study_report.py).

    oapl study configs/studies/evidence.yaml --parallel 2     # run every cell not finished yet, then the report
    oapl study configs/studies/evidence.yaml --dry-run        # list the cells and their state, run nothing
    oapl study configs/studies/evidence.yaml --report-only    # rebuild report.md and the plots

A study file:

    base: ../tiny_scratchpad.yaml        # the run config every cell starts from (relative to this file)
    out: runs/studies/evidence           # the study's directory (relative to the current directory)
    overrides: {optim.train_steps: 300}  # dotted overrides for every cell (a mapping, or a list of k=v)
    axes:                                # the grid is the product of the axes, in this order
      algo:                              # a named axis: label -> the overrides that label stands for
        oapl: {algo.loss: oapl}
        grpo_is: {algo.loss: grpo}
      lag.sync_every: [1, 10, 50]        # a field axis: one override per value
      seed: [0, 1, 2]                    # `seed_axis` (default: seed) is averaged over in the report
      reuse: [1, 2, 4]                   # reserved: an offline round whose groups are each used k times
                                         # (also allowed inside a named axis: `reuse2: {reuse: 2}`)

Each cell runs in OUT/<axis-label>__<axis-label>..., e.g. OUT/algo-oapl__sync_every-10__seed-0, with its
overrides in `cell.json` and `oapl train`'s output in `train.log`. A cell whose `oapl train` exited 0 gets a
`done.json` and is skipped from then on; a killed one is simply run again, and `oapl train` on an existing
run directory resumes from its `latest` checkpoint.

`reuse: k` makes a cell an offline round (lag.mode=offline): `oapl generate` first samples
ceil(optim.train_steps / k) steps of groups with the starting model into the cell's rollouts.jsonl, then the
run trains optim.train_steps steps on them, so each group is used k times and the generator stays frozen for
the whole run (one round; several offline rounds are not expressed by a study).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

REUSE_AXIS = "reuse"
DONE = "done.json"
CELL = "cell.json"
LOG = "train.log"
ROLLOUTS = "rollouts.jsonl"
_KEYS = ("base", "out", "overrides", "axes", "seed_axis")


class StudyError(ValueError):
    """The study file is wrong; the message names the file, the key and the value."""


@dataclass
class Cell:
    """One run of the grid: its labels (axis -> label), overrides and directory."""

    labels: dict[str, str]
    overrides: list[str]
    run_dir: Path
    reuse: int | None = None  # offline round: each group used this many times

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def done(self) -> bool:
        return (self.run_dir / DONE).is_file()

    @property
    def rollouts(self) -> Path:
        """An offline round's groups, sampled by `oapl generate` before the cell trains on them."""
        return self.run_dir / ROLLOUTS

    def state(self) -> str:
        if self.done:
            return "done"
        if (self.run_dir / "checkpoints" / "latest").is_file():
            return "resumable (" + (self.run_dir / "checkpoints" / "latest").read_text().strip() + ")"
        return "started, no checkpoint" if self.run_dir.is_dir() else "new"


@dataclass
class Study:
    path: Path
    base: Path
    out: Path
    seed_axis: str
    axes: list[str]
    cells: list[Cell] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Plan: the study file -> cells
# --------------------------------------------------------------------------------------------------


def override(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML, so `load_config` reads back exactly `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _label(value: Any) -> str:
    """A value as a piece of a directory name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"


def _overrides(where: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [override(str(k), v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        return list(raw)
    raise StudyError(f"{where}={raw!r} must be a mapping of dotted overrides or a list of key=value strings")


def _axis(path: Path, name: str, values: Any) -> list[tuple[str, list[str], int | None]]:
    """(label, overrides, reuse) for each value of one axis."""
    where = f"{path}: axes.{name}"
    if name == REUSE_AXIS:
        if not isinstance(values, list) or not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise StudyError(f"{where}={values!r} must be a list of integers >= 1 (times each group is used)")
        return [(f"{REUSE_AXIS}-{v}", [], v) for v in values]
    if isinstance(values, dict) and values:  # named: label -> overrides (`reuse: k` among them allowed)
        out = []
        for label, ovr in values.items():
            ovr = dict(ovr) if isinstance(ovr, dict) else ovr
            reuse = ovr.pop(REUSE_AXIS, None) if isinstance(ovr, dict) else None
            if reuse is not None and not (isinstance(reuse, int) and not isinstance(reuse, bool) and reuse >= 1):
                raise StudyError(f"{where}.{label}.reuse={reuse!r} must be an integer >= 1 (times each group is used)")
            out.append((f"{_label(name)}-{_label(label)}", _overrides(f"{where}.{label}", ovr), reuse))
        return out
    if isinstance(values, list) and values:  # a field: one override per value
        short = name.rsplit(".", 1)[-1]
        return [(f"{_label(short)}-{_label(v)}", [override(name, v)], None) for v in values]
    raise StudyError(f"{where}={values!r} must be a non-empty list of values (a config field) or a mapping "
                     "label -> overrides (a named axis)")


def load_study(path: str | Path) -> Study:
    """The study file's cells, each checked with `load_config` (a bad override fails before any run)."""
    from megatron_oapl.config import ConfigError, load_config

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"study file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"study file {path} must hold a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(_KEYS)})")
    if not isinstance(raw.get("base"), str):
        raise StudyError(f"{path}: base={raw.get('base')!r} must be the path of a run config "
                         "(relative to the study file)")
    base = (path.parent / raw["base"]).resolve()
    out = Path(raw.get("out") or Path("runs") / "studies" / path.stem)
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict) or not axes:
        raise StudyError(f"{path}: axes={axes!r} must be a non-empty mapping axis -> values")
    study = Study(path, base, out, str(raw.get("seed_axis", "seed")), list(axes))
    common = _overrides(f"{path}: overrides", raw.get("overrides"))
    per_axis = [_axis(path, name, values) for name, values in axes.items()]
    for combo in itertools.product(*per_axis):
        labels = {axis: label for axis, (label, _, _) in zip(axes, combo)}
        overrides = common + [o for _, ovr, _ in combo for o in ovr]
        reuse = next((r for _, _, r in combo if r is not None), None)
        cell = Cell(labels, overrides, out / "__".join(labels.values()), reuse)
        try:
            cfg = load_config(base, _run_overrides(cell), check_hardware=False)
        except ConfigError as err:
            raise StudyError(f"{path}: cell {cell.name}: {err}") from None
        if reuse is not None and cfg.optim.train_steps < reuse:
            raise StudyError(f"{path}: cell {cell.name}: optim.train_steps={cfg.optim.train_steps} must be >= "
                             f"reuse={reuse}")
        study.cells.append(cell)
    names = [c.name for c in study.cells]
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: two cells share a directory name; give the axes distinct labels")
    return study


def _run_overrides(cell: Cell) -> list[str]:
    """`oapl train`'s overrides for a cell (an offline round reads the cell's generated dataset)."""
    extra = [f"run_dir={cell.run_dir}"]
    if cell.reuse is not None:
        extra += ["lag.mode=offline", f"lag.offline_dataset={cell.rollouts}", "eval.every=0"]
    return [*cell.overrides, *extra]


def generation_steps(train_steps: int, reuse: int) -> int:
    """Steps of groups an offline round samples so that each is used `reuse` times over the run."""
    return math.ceil(train_steps / reuse)


# --------------------------------------------------------------------------------------------------
# Run: cells N at a time, each a subprocess
# --------------------------------------------------------------------------------------------------


class Runner:
    """Runs cells as `oapl train` subprocesses, `parallel` at a time. The children share the study's
    process group, so Ctrl-C reaches them directly (each checkpoints and exits); a SIGTERM to the study alone
    is passed on to them."""

    def __init__(self, study: Study, parallel: int):
        self.study, self.parallel = study, parallel
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False
        # Cells running side by side split the cores: OpenMP threads that outnumber them spin against each
        # other (two cells' evaluations at 2 threads each on 2 cores ran ~4x slower than one at a time).
        cores = len(os.sched_getaffinity(0))
        self.env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // parallel))} if parallel > 1 else None

    def _say(self, text: str) -> None:
        log.info("%s", text)

    def _call(self, cmd: list[str], transcript) -> int:
        with self.lock:
            if self.stopping:
                return -signal.SIGTERM
            proc = subprocess.Popen(cmd, stdout=transcript, stderr=subprocess.STDOUT, env=self.env)
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def run_cell(self, cell: Cell, index: int) -> bool:
        if self.stopping:  # a signal arrived before this cell's turn
            return False
        total = len(self.study.cells)
        state = cell.state()
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"labels": cell.labels, "overrides": cell.overrides, "reuse": cell.reuse,
                  "base": str(self.study.base)}
        previous = cell.run_dir / CELL
        if previous.is_file() and json.loads(previous.read_text()) != record:
            self._say(f"{index}/{total} {cell.name}: FAILED: its cell.json differs from the study file (the study "
                      "changed since it ran); delete the directory or use another `out`")
            return False
        previous.write_text(json.dumps(record, indent=2) + "\n")
        self._say(f"{index}/{total} {cell.name}: start ({state})")
        start = time.monotonic()
        with open(cell.run_dir / LOG, "a") as transcript:
            if cell.reuse is not None and not cell.rollouts.is_file():
                from megatron_oapl.config import load_config

                steps = generation_steps(load_config(self.study.base, _run_overrides(cell),
                                                     check_hardware=False).optim.train_steps, cell.reuse)
                cmd = [sys.executable, "-m", "megatron_oapl.cli", "generate", str(self.study.base), *cell.overrides,
                       f"run_dir={cell.run_dir / 'generate'}", "--out", str(cell.rollouts),
                       "--steps", str(steps)]
                transcript.write(f"$ {' '.join(cmd)}\n")
                transcript.flush()
                rc = self._call(cmd, transcript)
                if rc != 0:
                    self._say(f"{index}/{total} {cell.name}: FAILED: oapl generate exited {rc} "
                              f"(see {cell.run_dir / LOG})")
                    return False
            cmd = [sys.executable, "-m", "megatron_oapl.cli", "train", str(self.study.base), *_run_overrides(cell)]
            transcript.write(f"$ {' '.join(cmd)}\n")
            transcript.flush()
            rc = self._call(cmd, transcript)
        seconds = time.monotonic() - start
        if rc != 0:
            self._say(f"{index}/{total} {cell.name}: FAILED: oapl train exited {rc} after {seconds:.0f} s "
                      f"(see {cell.run_dir / LOG}; rerun the study to resume it)")
            return False
        (cell.run_dir / DONE).write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
        self._say(f"{index}/{total} {cell.name}: done in {seconds:.0f} s")
        return True

    def _terminate(self, signum, _frame) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.procs:
                proc.send_signal(signum)

    def run(self) -> list[Cell]:
        """Runs every unfinished cell; returns the ones that failed."""
        todo = [(i, c) for i, c in enumerate(self.study.cells, start=1) if not c.done]
        for i, cell in enumerate(self.study.cells, start=1):
            if cell.done:
                self._say(f"{i}/{len(self.study.cells)} {cell.name}: skip (done)")
        old = signal.signal(signal.SIGTERM, self._terminate)
        try:
            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                futures = [pool.submit(self.run_cell, cell, i) for i, cell in todo]
                try:
                    results = [f.result() for f in futures]
                except KeyboardInterrupt:  # Ctrl-C reached the runs too (same process group): start no more
                    self.stopping = True
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            signal.signal(signal.SIGTERM, old)
        return [cell for (_, cell), ok in zip(todo, results) if not ok]


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def main(study_file: str, parallel: int = 1, report_only: bool = False, dry_run: bool = False) -> int:
    from megatron_oapl.study_report import write_report

    if parallel < 1:
        print(f"error: --parallel={parallel} must be >= 1", file=sys.stderr)
        return 2
    try:
        study = load_study(study_file)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        for i, cell in enumerate(study.cells, start=1):
            offline = f"  [offline round, each group used {cell.reuse}x]" if cell.reuse is not None else ""
            print(f"{i}/{len(study.cells)} {cell.run_dir}: {cell.state()}  {' '.join(cell.overrides)}{offline}")
        return 0
    start = time.monotonic()
    try:
        failed = [] if report_only else Runner(study, parallel).run()
    except KeyboardInterrupt:
        log.warning("interrupted; run the same command again to resume")
        return 130
    report = write_report(study)
    print(f"report: {report} ({(time.monotonic() - start) / 60:.1f} min in all)")
    if failed:
        log.error("%d of %d cells failed (%s); run the same command again to resume them", len(failed),
                  len(study.cells), ", ".join(c.name for c in failed))
        return 1
    return 0
