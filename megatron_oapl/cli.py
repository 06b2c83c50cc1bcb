"""`oapl`: the command line. Parses arguments before any heavy import, so `--help` is instant.

    oapl config show configs/tiny.yaml [key=value ...]   print the resolved config with field docs
    oapl train configs/tiny.yaml [key=value ...]         the main job (learners + fleet on this machine)
    oapl eval configs/tiny.yaml --model DIR              pass@k of an HF model directory on each eval set
    oapl plan CONFIG [key=value ...] --gpu-memory-gb 80  per-GPU memory of learners and engines
    oapl convert megatron-to-hf | hf-to-megatron ...     checkpoint conversion (see its --help)
    oapl launch slurm CONFIG [options]                   heterogeneous SLURM job (see docs/cluster.md)
    oapl study STUDY.yaml [--parallel N] [--report-only] a grid of runs + report (configs/studies/)
    oapl data prepare math|code --train SRC --eval SRC --out DIR   HF datasets -> train/eval prompt files

Multi-GPU and SLURM invocations are documented under each subcommand's --help.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("oapl.cli")


def _config_show(args) -> int:
    from megatron_oapl.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, tuple(args.overrides), check_hardware=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_yaml(cfg, docs=True), end="")
    return 0


def _load(args, hf_path: str | None = None):
    """The resolved run config; `hf_path` replaces model.hf_path first (`oapl eval --model`), so the
    config's own model directory is never read."""
    import dataclasses

    from megatron_oapl.config import ConfigError, load_config
    from megatron_oapl.models.hf_config import resolve_model

    cfg = load_config(args.config, tuple(args.overrides))
    if hf_path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=hf_path))
    if not cfg.model.hf_path:
        raise ConfigError("model.hf_path=null must be set: training starts from an HF model directory "
                          "(for the tiny default: python tools/make_tiny_model.py --out runs/tiny-model)")
    return resolve_model(cfg)


def _plan(args) -> int:
    """`oapl plan`: the memory table; exit 1 with one line naming the field to change when it does not fit."""
    from megatron_oapl.config import load_config
    from megatron_oapl.plan import data_parallel_size, format_plan, make_memory_plan, model_source

    cfg, source = model_source(load_config(args.config, tuple(args.overrides), check_hardware=False))
    gpu_gb = args.gpu_memory_gb or _device_memory_gb() or 80.0
    plan = make_memory_plan(cfg, gpu_gb, data_parallel_size(cfg, args.learner_gpus))
    print(format_plan(cfg, plan, source))
    for note in plan.notes(cfg):
        print(f"note: {note}")
    problem = plan.problem(cfg)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


def _device_memory_gb() -> float | None:
    """This machine's GPU memory in GB (1e9 bytes), or None without a CUDA GPU."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else None


def _check_memory_before_start(cfg, args) -> None:
    """`oapl train` on a GPU (or with --gpu-memory-gb): refuse a run the memory plan says does not fit
    (ConfigError: one line, exit 2) unless --force; CPU runs without --gpu-memory-gb are not checked."""
    import os

    from megatron_oapl.config import ConfigError
    from megatron_oapl.launcher import world_size_of
    from megatron_oapl.plan import PlanError, check_memory, data_parallel_size

    gpu_gb = args.gpu_memory_gb or _device_memory_gb()
    if gpu_gb is None:
        return
    world = int(os.environ.get("WORLD_SIZE") or world_size_of(cfg))
    try:
        check_memory(cfg, gpu_gb, data_parallel_size(cfg, world))
    except PlanError as err:
        if not args.force:
            raise ConfigError(f"{err} (`oapl plan` shows the table; --force starts anyway)") from None
        log.warning("%s (starting anyway: --force)", err)


def _summary_line(before, after) -> str:
    """The run's last line: pass@1 before -> after (each ± its standard error over prompts), then the gain
    with its paired standard error (same prompts, so prompt difficulty cancels) and their ratio."""
    from megatron_oapl.evaluation import paired_gain

    gain, stderr = paired_gain(before, after)
    ratio = f"{gain / stderr:+.1f}" if stderr > 0 else "n/a"
    return (f"pass@1: {before.pass_at_k[1]:.3f} ± {before.stderr[1]:.3f} -> "
            f"{after.pass_at_k[1]:.3f} ± {after.stderr[1]:.3f}  "
            f"(gain {gain:+.3f} ± {stderr:.3f} paired, {ratio} SE)")


def _stopped(run_dir, end) -> int:
    """A run that ended before its last step (a signal or a deadline: it saved a checkpoint; or killed on a
    second signal): where it can resume from."""
    import signal

    latest = run_dir / "checkpoints" / "latest"
    ckpt = run_dir / "checkpoints" / latest.read_text().strip() if latest.is_file() else None
    name = signal.Signals(end.stop_signal).name if end.stop_signal else None
    if end.killed:
        what = f"was killed on a second {name}; " + (f"its last complete checkpoint is {ckpt}" if ckpt else
                                                      "it has no checkpoint yet")
    else:
        what = (f"stopped on {name}" if name else "stopped early (see the log)") + (
            f" at its checkpoint {ckpt}" if ckpt else " before its first checkpoint")
    log.warning("the run %s; run the same command again to resume", what)
    return 128 + end.stop_signal if end.stop_signal else 1


def _train(args) -> int:
    import contextlib
    import os
    from pathlib import Path

    from megatron_oapl.config import to_dict, to_yaml
    from megatron_oapl.data.checks import check_run_data
    from megatron_oapl.run_lock import RunLock

    cfg = _load(args)
    _check_memory_before_start(cfg, args)
    run_dir = Path(cfg.run_dir)
    if "RANK" in os.environ:  # under torchrun / srun: this process is one learner rank
        from megatron_oapl.train import train

        # Global rank 0 holds the run directory; every rank checks the data before the first collective.
        with RunLock(run_dir) if os.environ["RANK"] == "0" else contextlib.nullcontext():
            check_run_data(cfg)
            train(to_dict(cfg))
        return 0
    from megatron_oapl.evaluation import evaluate, format_table, train_reports, write_reports
    from megatron_oapl.launcher import spawn_learners
    from megatron_oapl.procs import forked_children_die_with_this_process

    forked_children_die_with_this_process()  # what a reward or library forks here ends with `oapl train`
    with RunLock(run_dir):  # refuses a second `oapl train` on this run directory
        # Everything the ranks and engines will read, read here first: a bad record costs seconds.
        log.info("%s", check_run_data(cfg))
        (run_dir / "config.yaml").write_text(to_yaml(cfg, docs=True))
        # Online, the training fleet evaluates the initial and the final weights (RUN_DIR/eval/history.jsonl);
        # an offline round has no fleet: engines of its own (fleet.engine, TP, dtype, device) evaluate them.
        online = cfg.lag.mode == "online"
        before = None if online else evaluate(cfg, cfg.model.hf_path, progress=True)
        end = spawn_learners(cfg)
        if end.stop_signal is not None or not (run_dir / "hf").is_dir():
            return _stopped(run_dir, end)
        if online:
            before = _fleet_report(cfg, 0, cfg.model.hf_path)
            after = _fleet_report(cfg, cfg.optim.train_steps, str(run_dir / "hf"))
        else:
            after = evaluate(cfg, str(run_dir / "hf"), progress=True)
    reports = train_reports(before, after)  # "before"/"after": the first set; "<set>/before"...: the others
    write_reports(run_dir / "eval", reports)
    print(format_table(reports))
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}  |  final model: {run_dir / 'hf'}")
    for name in list(before)[1:]:
        print(f"{name}: {_summary_line(before[name], after[name])}")
    first = next(iter(before))
    print(_summary_line(before[first], after[first]))
    return 0


def _fleet_report(cfg, step: int, model_dir: str):
    """The training fleet's evaluation at `step` of the weights in `model_dir`, by set; engines of their own
    evaluate them if it left none (a run resumed from a checkpoint an older version of the package wrote)."""
    from megatron_oapl.evaluation import eval_sets, evaluate, fleet_reports

    reports = fleet_reports(cfg.run_dir, step, list(eval_sets(cfg)))
    if reports is None:
        log.info("no evaluation of the training fleet at step %d in %s/eval: evaluating %s now", step, cfg.run_dir,
                 model_dir)
        reports = evaluate(cfg, model_dir, progress=True)
    return reports


def _eval(args) -> int:
    from pathlib import Path

    from megatron_oapl.evaluation import evaluate, format_sets_table, write_reports

    cfg = _load(args, hf_path=args.model)
    log.info("evaluating %s with fleet.engine=%s (%d engine(s))", cfg.model.hf_path, cfg.fleet.engine,
             cfg.fleet.num_engines)
    reports = evaluate(cfg, cfg.model.hf_path, progress=True)  # by eval set
    out = write_reports(Path(args.out or Path(cfg.run_dir) / "eval"), reports)
    print(format_sets_table(reports))
    print(f"report: {out / 'eval.json'}, plot: {out / 'pass_at_k.png'}")
    first = next(iter(reports.values()))
    print(f"pass@1: {first.pass_at_k[1]:.3f} ± {first.stderr[1]:.3f}")
    return 0


def _generate(args) -> int:
    from megatron_oapl.config import to_dict
    from megatron_oapl.rollout.dataset import generate

    cfg = _load(args)
    steps = cfg.optim.train_steps if args.steps is None else args.steps
    if steps < 1:
        raise SystemExit(f"error: --steps={steps} must be >= 1")
    if cfg.fleet.external:
        raise SystemExit("error: fleet.external=true: `oapl generate` starts its own engines on this machine "
                         "(allowed: false)")
    out = generate(cfg, to_dict(cfg), args.out, steps)
    if cfg.fleet.dynamic_sampling:  # the groups the steps skip are in the file too
        with open(out, "rb") as f:
            count = sum(1 for _ in f)
        print(f"wrote {count} groups for {steps} steps (fleet.dynamic_sampling: {steps} x prompts_per_step="
              f"{cfg.fleet.prompts_per_step} with differing scores, and the all-equal ones between them) sampled "
              f"by {cfg.model.hf_path} to {out}")
        return 0
    print(f"wrote {steps * cfg.fleet.prompts_per_step} groups ({steps} steps x fleet.prompts_per_step="
          f"{cfg.fleet.prompts_per_step}) sampled by {cfg.model.hf_path} to {out}")
    return 0


def _study(args) -> int:
    from megatron_oapl.study import main as study_main

    return study_main(args.study, args.parallel, args.report_only, args.dry_run)


def _add_config_parser(sub) -> None:
    """`oapl config show`."""
    config = sub.add_parser("config", help="inspect run configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", help="print the resolved config (YAML + overrides) with each field's documentation"
    )
    show.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.beta2=0.1")
    show.set_defaults(func=_config_show)


def _add_train_parser(sub) -> None:
    """`oapl train`."""
    train = sub.add_parser(
        "train", help="run OAPL: learners + engine fleet (+ pass@k before/after on this machine)",
        description="Local: `oapl train configs/tiny.yaml` spawns TP*PP*DP learner ranks and the engines. "
        "Multi-node: run `oapl train CONFIG` under torchrun/srun (one process per GPU; RANK etc. set), "
        "or submit with `oapl launch slurm` (see docs/). SIGTERM / SIGUSR1 / Ctrl-C: the ranks save a checkpoint "
        "and stop (exit code 128 + the signal's number; the same command resumes); a second Ctrl-C kills them. "
        "Config or data errors, or a run directory in use: one `error:` line, exit code 2.",
    )
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.train_steps=50")
    from megatron_oapl.plan import add_memory_check_arguments

    add_memory_check_arguments(train)
    train.set_defaults(func=_train)


def _add_eval_parser(sub) -> None:
    """`oapl eval`."""
    ev = sub.add_parser("eval", help="pass@k (k = 1..n) and avg@n of an HF model directory on each eval set, "
                        "sampled by the fleet's engines (fleet.engine)")
    ev.add_argument("config", help="YAML run config (data, rewards, fleet, eval sections are used)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_samples=16")
    ev.add_argument("--model", help="HF model directory (default: model.hf_path)")
    ev.add_argument("--out", help="report directory (default: RUN_DIR/eval)")
    ev.set_defaults(func=_eval)


def _add_generate_parser(sub) -> None:
    """`oapl generate`."""
    gen = sub.add_parser(
        "generate", help="sample an offline rollout dataset with the fleet (for lag.mode=offline)",
        description="Sample the work orders of steps 1..N with model.hf_path on the fleet and write them as "
        "JSONL; train on them with lag.mode=offline lag.offline_dataset=PATH (one OAPL round, no pushes).",
    )
    gen.add_argument("config", help="YAML run config (model, data, fleet sections are used)")
    gen.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fleet.num_engines=4")
    gen.add_argument("--out", required=True, help="JSONL file to write")
    gen.add_argument("--steps", type=int, help="optimizer steps to cover (default: optim.train_steps)")
    gen.set_defaults(func=_generate)


def _add_plan_parser(sub) -> None:
    """`oapl plan`."""
    plan = sub.add_parser(
        "plan", help="per-GPU memory of the learners and engines; exit 1 naming the field to change if it does "
        "not fit",
        description="Weights, fp32 gradients, Adam state (sharded over DP with the distributed optimizer), "
        "activations per micro-batch with and without recompute, the log-prob path, and the vLLM engine's "
        "weights, KV cache and push headroom, from the config alone (formulas: megatron_oapl/plan.py). Model "
        "sizes come from model.hf_path's config.json when it is here, else from the config's model fields.",
    )
    plan.add_argument("config", help="YAML run config, e.g. configs/qwen3_4b_math.yaml")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.micro_batch_tokens=16384")
    plan.add_argument("--gpu-memory-gb", type=float, default=None,
                      help="memory of one GPU in GB (1e9 bytes; default: this machine's GPU, else 80)")
    plan.add_argument("--learner-gpus", type=int, default=None,
                      help="learner GPUs in all, for DP (default: TP x PP x parallel.data_parallel_size, "
                           "DP=1 when that is null: the optimizer unsharded)")
    plan.set_defaults(func=_plan)


def _add_study_parser(sub) -> None:
    """`oapl study`."""
    study = sub.add_parser(
        "study", help="run a grid of training runs from one study YAML (resumable) and write a report",
        description="Runs every cell of the grid that has not finished (a killed cell resumes from its "
        "checkpoint), N at a time on this machine, then writes report.md and PNG plots in the study's "
        "out directory. The file format is in megatron_oapl/study.py; examples in configs/studies/.",
    )
    study.add_argument("study", help="study YAML, e.g. configs/studies/evidence.yaml")
    study.add_argument("--parallel", type=int, default=1, help="cells run at once (default 1)")
    study.add_argument("--report-only", action="store_true", help="only rebuild the report from finished cells")
    study.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    study.set_defaults(func=_study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oapl",
        description="OAPL post-training: Megatron-Core learners, a lagged vLLM fleet, fixed lag schedule.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_config_parser, _add_train_parser, _add_eval_parser, _add_generate_parser, _add_plan_parser,
                _add_study_parser):
        add(sub)

    from launch.slurm import add_launch_parser
    from megatron_oapl.checkpoint.convert import add_convert_parser
    from megatron_oapl.data.prepare import add_data_parser

    add_convert_parser(sub)
    add_launch_parser(sub)
    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a crash (traceback); 2 a user error: config, data, tokenizer, a run directory
    in use or with only damaged checkpoints (one `error:` line); 128+N `oapl train` stopped by signal N
    after saving a checkpoint (the same command resumes); 130 interrupted before training started."""
    from megatron_oapl.log_setup import setup_logging

    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a nargs="*" positional at the first option, so overrides written after an option
    # (`oapl eval CONFIG --model DIR eval.num_samples=16`) come back unparsed: they are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside the training (while the ranks run, it stops them cleanly)
        log.warning("interrupted")
        return 130
    except Exception as err:
        from megatron_oapl.launcher import RankFailed, is_user_error

        if isinstance(err, RankFailed) and not err.user_error:  # the rank's traceback is printed already
            print(f"error: {err}", file=sys.stderr)
            return 1
        if not is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
