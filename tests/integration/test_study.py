"""`oapl study` end to end on real runs: a 2 x 2 grid (algo.loss x seed) of 3-step tiny runs. The study is
SIGKILLed (with its runs) while its third cell trains, then run again: the two finished cells are skipped,
the killed one resumes from its checkpoint, the last one runs, and the report (table + plots, read back
through TensorBoard's reader) covers all four. One study is shared by every test of the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_oapl import metrics as M
from megatron_oapl.study_report import read_scalars

ROOT = Path(__file__).resolve().parents[2]
CELLS = ["algo-oapl__seed-0", "algo-oapl__seed-1", "algo-grpo__seed-0", "algo-grpo__seed-1"]
KILLED = CELLS[2]


def oapl_study(study_file: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_oapl.cli", "study", str(study_file), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def write_study(path: Path, model_dir: Path, out: Path, **extra) -> Path:
    study = {
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "out": str(out),
        "overrides": {"model.hf_path": str(model_dir), "parallel.tensor_model_parallel_size": 1,
                      "data.num_train_prompts": 500, "data.num_eval_prompts": 8, "eval.num_samples": 4,
                      "fleet.prompts_per_step": 2, "optim.train_steps": 3, "lag.sync_every": 1, "eval.every": 1,
                      "checkpoint.save_every": 1},
        "axes": {"algo": {"oapl": {"algo.loss": "oapl"}, "grpo": {"algo.loss": "grpo"}}, "seed": [0, 1]},
        **extra,
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory):
    """(study dir, output of the first (killed) invocation, output of the second, done.json mtimes of the
    cells finished before the kill)."""
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "out"
    study_file = write_study(tmp / "study.yaml", tiny_model, out)
    first = oapl_study(study_file, start_new_session=True)
    latest = out / KILLED / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 300
        while not latest.is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the third cell never checkpointed"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the study and every run it started: like a node failure
        first_out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (out / KILLED / "done.json").exists(), "the cell finished before it could be killed"
    finished = {c: (out / c / "done.json").stat().st_mtime_ns for c in CELLS[:2]}
    second = oapl_study(study_file)
    second_out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, second_out[-4000:]
    return out, first_out, second_out, finished


def test_finished_cells_are_skipped(study):
    out, _, second_out, finished = study
    for cell in CELLS[:2]:
        assert f"{cell}: skip (done)" in second_out
        assert (out / cell / "done.json").stat().st_mtime_ns == finished[cell]
        log = (out / cell / "train.log").read_text()
        assert log.count("megatron_oapl.cli train") == 1  # never started again


def test_killed_cell_resumes_from_its_checkpoint(study):
    out, _, second_out, _ = study
    assert f"{KILLED}: start (resumable (step_" in second_out
    log = (out / KILLED / "train.log").read_text()
    assert log.count("megatron_oapl.cli train") == 2 and "resuming from" in log
    tb = read_scalars(out / KILLED / "tensorboard")
    assert sorted(tb[M.LOSS]) == [1, 2, 3]
    assert all((out / c / "done.json").is_file() for c in CELLS)


def table_rows(report: str) -> dict[str, dict[str, str]]:
    """The report's first table: run -> {column header: cell}."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])
    return {row[0]: dict(zip(header, row)) for row in rows if len(row) == len(header)}


def test_report_table_and_plots(study):
    out, *_ = study
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert set(rows) == {"algo-oapl", "algo-grpo"}
    for algo in ("oapl", "grpo"):
        cells = [out / f"algo-{algo}__seed-{s}" for s in (0, 1)]
        row = rows[f"algo-{algo}"]
        # Final pass@k: the mean over the two seeds of each run's closing evaluation (k = 1, 2 and 4 of 4).
        for k in (1, 2, 4):
            values = [json.loads((c / "eval" / "eval.json").read_text())["after"]["pass_at_k"][str(k)] for c in cells]
            assert row[f"pass@{k} final"].startswith(f"{sum(values) / 2:.3f} ± ")
            if k == 1:  # the seeds' own spread beside the mean's standard error
                sd = abs(values[0] - values[1]) / 2 ** 0.5
                assert row["pass@1 final seed sd [min, max]"] == f"{sd:.3f} [{min(values):.3f}, {max(values):.3f}]"
        assert row["seeds"] == "2" and row["generations consumed"] == "48"  # 3 steps x 2 prompts x 8 samples
        # Drift signals: the sequence entropy of the first and last tenth of the steps (here step 1 and 3).
        entropy = [read_scalars(c / "tensorboard")[M.SEQUENCE_ENTROPY] for c in cells]
        first, last = (sum(e[s] for e in entropy) / 2 for s in (1, 3))
        assert row["seq. entropy first 10% -> last 10%"].startswith(f"{first:.2f} ± ") and f"-> {last:.2f} ± " in row[
            "seq. entropy first 10% -> last 10%"]
        # GRPO alone clips; OAPL's sequence log-ratio is logged, GRPO's too.
        assert (row["clip fraction last 25%"] == "—") == (algo == "oapl")
        assert row["abs log-ratio last 25%"] != "—"
    for name in ("pass1_vs_step", "pass1_vs_generations", "pass_at_k_final", "sequence_entropy_vs_step",
                 "abs_log_ratio_vs_step", "clip_fraction_vs_step", "grad_norm_vs_step"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name}.png)" in report


def test_report_only_rebuilds_without_running(study):
    out, *_ = study
    (out / "report.md").unlink()
    (out / "pass1_vs_step.png").unlink()
    proc = oapl_study(Path(out).parent / "study.yaml", "--report-only")
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-3000:]
    assert "start" not in text and (out / "report.md").is_file() and (out / "pass1_vs_step.png").is_file()


def test_bad_override_is_one_line_before_any_run(tiny_model, tmp_path):
    study_file = write_study(tmp_path / "bad.yaml", tiny_model, tmp_path / "out",
                             axes={"algo.beta2": [0.5, -1.0]})
    proc = oapl_study(study_file)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and text.strip().count("\n") == 0, text
    assert "algo.beta2=-1.0 must be > 0" in text and "cell beta2--1.0" in text
    assert not (tmp_path / "out").exists()


def test_reuse_cell_samples_once_and_trains_offline(tiny_model, tmp_path):
    """`reuse: 2`: the cell samples ceil(4 / 2) = 2 steps of groups once, then trains 4 offline steps on them
    (each group used twice, no weight push); the report counts 32 generations sampled, 64 consumed."""
    out = tmp_path / "out"
    study_file = write_study(tmp_path / "reuse.yaml", tiny_model, out, axes={"data": {"reuse2": {"reuse": 2}}})
    study_text = yaml.safe_load(study_file.read_text())
    study_text["overrides"].update({"optim.train_steps": 4, "eval.every": 0})
    study_file.write_text(yaml.safe_dump(study_text, sort_keys=False))
    proc = oapl_study(study_file)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    cell = out / "data-reuse2"
    assert len((cell / "rollouts.jsonl").read_text().splitlines()) == 4  # 2 steps x 2 prompts
    tb = read_scalars(cell / "tensorboard")
    assert sorted(tb[M.LOSS]) == [1, 2, 3, 4] and M.SYNC_SECONDS not in tb
    row = table_rows((out / "report.md").read_text())["data-reuse2"]
    assert (row["generations sampled"], row["generations consumed"]) == ("32", "64")
