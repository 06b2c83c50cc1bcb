"""`oapl`: the command line. Parses arguments before any heavy import, so `--help` is instant.

    oapl config show configs/tiny.yaml [key=value ...]   print the resolved config with field docs
    oapl train configs/tiny.yaml [key=value ...]         the main job (learners + fleet on this machine)
    oapl eval configs/tiny.yaml --model DIR              pass@k of an HF model directory
    oapl convert megatron-to-hf | hf-to-megatron ...     checkpoint conversion (see its --help)
    oapl launch slurm CONFIG [options]                   heterogeneous SLURM job (see docs/cluster.md)

Multi-GPU and SLURM invocations are documented under each subcommand's --help.
"""

from __future__ import annotations

import argparse
import sys


def _config_show(args) -> int:
    from megatron_oapl.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, tuple(args.overrides), check_hardware=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_yaml(cfg, docs=True), end="")
    return 0


def _load(args):
    from megatron_oapl.config import load_config
    from megatron_oapl.models.hf_config import resolve_model

    cfg = resolve_model(load_config(args.config, tuple(args.overrides)))
    if not cfg.model.hf_path:
        raise SystemExit(
            "error: model.hf_path is not set: training starts from an HF model directory "
            "(for the tiny default: python tools/make_tiny_model.py --out runs/tiny-model)"
        )
    return cfg


def _summary_line(before, after) -> str:
    """The run's last line: pass@1 before -> after (each ± its standard error over prompts), then the gain
    with its paired standard error (same prompts, so prompt difficulty cancels) and their ratio."""
    from megatron_oapl.evaluation import paired_gain

    gain, stderr = paired_gain(before, after)
    ratio = f"{gain / stderr:+.1f}" if stderr > 0 else "n/a"
    return (f"pass@1: {before.pass_at_k[1]:.3f} ± {before.stderr[1]:.3f} -> "
            f"{after.pass_at_k[1]:.3f} ± {after.stderr[1]:.3f}  "
            f"(gain {gain:+.3f} ± {stderr:.3f} paired, {ratio} SE)")


def _train(args) -> int:
    import os
    from pathlib import Path

    from megatron_oapl.config import to_dict, to_yaml

    cfg = _load(args)
    if "RANK" in os.environ:  # under torchrun / srun: this process is one learner rank
        from megatron_oapl.train import train

        train(to_dict(cfg))
        return 0
    from megatron_oapl.evaluation import evaluate, format_table, write_reports
    from megatron_oapl.launcher import spawn_learners

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg, docs=True))
    before = evaluate(cfg, cfg.model.hf_path, progress=True)
    print(f"before training: pass@1 {before.pass_at_k[1]:.3f} ± {before.stderr[1]:.3f}", flush=True)
    spawn_learners(cfg)
    if not (run_dir / "hf").is_dir():
        raise SystemExit(f"the run stopped before its last step (a signal; see the log); run the same command "
                         f"again to resume from its latest checkpoint in {run_dir / 'checkpoints'}")
    after = evaluate(cfg, str(run_dir / "hf"), progress=True)
    reports = {"before": before, "after": after}
    write_reports(run_dir / "eval", reports)
    print(format_table(reports))
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}  |  final model: {run_dir / 'hf'}")
    print(_summary_line(before, after))
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from megatron_oapl.evaluation import evaluate, format_table, write_reports

    cfg = _load(args)
    report = evaluate(cfg, args.model or cfg.model.hf_path, progress=True)
    out = write_reports(Path(args.out or Path(cfg.run_dir) / "eval"), {"model": report})
    print(format_table({"model": report}))
    print(f"report: {out / 'eval.json'}, plot: {out / 'pass_at_k.png'}")
    print(f"pass@1: {report.pass_at_k[1]:.3f} ± {report.stderr[1]:.3f}")
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
    print(f"wrote {steps * cfg.fleet.prompts_per_step} groups ({steps} steps x fleet.prompts_per_step="
          f"{cfg.fleet.prompts_per_step}) sampled by {cfg.model.hf_path} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oapl",
        description="OAPL post-training: Megatron-Core learners, a lagged vLLM fleet, fixed lag schedule.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", help="print the resolved config (YAML + overrides) with each field's documentation"
    )
    show.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.beta2=0.1")
    show.set_defaults(func=_config_show)

    train = sub.add_parser(
        "train", help="run OAPL: learners + engine fleet (+ pass@k before/after on this machine)",
        description="Local: `oapl train configs/tiny.yaml` spawns TP*PP*DP learner ranks and the engines. "
        "Multi-node: run `oapl train CONFIG` under torchrun/srun (one process per GPU; RANK etc. set), "
        "or submit with `oapl launch slurm` (see docs/).",
    )
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.train_steps=50")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="pass@k (k = 1..n) of an HF model directory on the held-out prompts")
    ev.add_argument("config", help="YAML run config (data, rewards, eval sections are used)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_samples=16")
    ev.add_argument("--model", help="HF model directory (default: model.hf_path)")
    ev.add_argument("--out", help="report directory (default: RUN_DIR/eval)")
    ev.set_defaults(func=_eval)

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

    from launch.slurm import add_launch_parser
    from megatron_oapl.checkpoint.convert import add_convert_parser

    add_convert_parser(sub)
    add_launch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a nargs="*" positional at the first option, so overrides written after an option
    # (`oapl eval CONFIG --model DIR eval.num_samples=16`) come back unparsed: they are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
