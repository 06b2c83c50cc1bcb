"""`oapl study --parallel N` splits the cores between the runs it starts side by side: each child gets
OMP_NUM_THREADS = cores // N (OpenMP threads that outnumber the cores spin against each other); one run at
a time keeps the environment as it is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_oapl.study import Runner, Study

PRINT_THREADS = [sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS', 'unset'))"]


def child_threads(tmp_path: Path, parallel: int) -> str:
    study = Study(tmp_path / "study.yaml", tmp_path / "base.yaml", tmp_path / "out", "seed", ["seed"])
    log_path = tmp_path / f"child-{parallel}.log"
    with open(log_path, "w") as log:
        assert Runner(study, parallel)._call(PRINT_THREADS, log) == 0
    return log_path.read_text().strip()


def test_runs_side_by_side_split_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert child_threads(tmp_path, 2) == str(max(1, cores // 2))
    assert child_threads(tmp_path, 4 * cores) == "1"  # never 0


def test_one_run_at_a_time_keeps_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert child_threads(tmp_path, 1) == "unset"
