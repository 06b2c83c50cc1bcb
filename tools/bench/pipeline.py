"""Benchmark: the asynchronous loop on this machine, read back from TensorBoard.

Three short `oapl train` runs of the same work on the tiny default (same model, steps, batch):
  async     lag L=10, logp_lag from the engine: learner idle fraction (goal <= 10%)
  sync      L=1: every step waits for groups sampled after the previous step's sync, i.e. generate,
            then train (on one 2-core box learners and engines share the cores, so expect no gain;
            the point is where the time goes)
  recompute L=10, logp_lag recomputed by the learner: step time vs async (goal <= 1.4x)

    python tools/bench/pipeline.py --model runs/tiny-model --steps 60

Last line: `recompute/engine step time: <x>`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(name: str, model: str, steps: int, out: Path, *overrides: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_oapl import metrics as M
    from megatron_oapl.train import train  # noqa: F401  (fail early if the package is broken)

    run_dir = out / name
    cmd = [sys.executable, "-c", "import sys; from megatron_oapl.config import load_config, to_dict; "
           "from megatron_oapl.launcher import spawn_learners; from megatron_oapl.models.hf_config import resolve_model; "
           "spawn_learners(resolve_model(load_config(sys.argv[1], tuple(sys.argv[2:]))))",
           str(ROOT / "configs" / "tiny.yaml"), f"model.hf_path={model}", f"run_dir={run_dir}",
           f"optim.train_steps={steps}", "eval.every=0", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    def values(name: str) -> list[float]:
        return [e.value for e in acc.Scalars(name)] if name in acc.Tags()["scalars"] else []

    step_times = values(M.STEP_SECONDS)[5:]  # skip start-up
    waits = values(M.WAIT_SECONDS)[5:]
    syncs = values(M.SYNC_SECONDS)
    return {"wall": wall, "step": statistics.median(step_times), "idle": values(M.IDLE_FRACTION)[-1],
            # where a step's time goes (means over steps after start-up; sync spread over all steps)
            "wait": statistics.fmean(waits), "sync": sum(syncs) / steps,
            "latency": statistics.fmean(values(M.GROUP_LATENCY_SECONDS)[5:]),
            "train": statistics.fmean(step_times) - statistics.fmean(waits)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="tiny HF model dir (tools/make_tiny_model.py)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for all three runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = {
            "async": run("async", args.model, args.steps, out, *args.overrides, "lag.sync_every=10"),
            "sync": run("sync", args.model, args.steps, out, *args.overrides, "lag.sync_every=1"),
            "recompute": run("recompute", args.model, args.steps, out, *args.overrides, "lag.sync_every=10",
                             "algo.logp_lag_source=recompute"),
        }
    for name, r in results.items():
        print(f"{name:>9}: wall {r['wall']:6.1f} s, median step {r['step'] * 1e3:6.0f} ms, learner idle "
              f"{r['idle']:.1%}; per step: waiting {r['wait'] * 1e3:5.0f} ms, training+sync "
              f"{r['train'] * 1e3:5.0f} ms (of which sync {r['sync'] * 1e3:4.0f} ms); a group's latency (order "
              f"taken -> scored) {r['latency'] * 1e3:5.0f} ms")
    print(f"async/sync wall-clock: {results['async']['wall'] / results['sync']['wall']:.3f}")
    print(f"learner idle fraction (async): {results['async']['idle']:.3f}")
    print(f"recompute/engine step time: {results['recompute']['step'] / results['async']['step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
