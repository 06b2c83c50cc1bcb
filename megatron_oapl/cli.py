"""`oapl`: the command line. Parses arguments before any heavy import, so `--help` is instant.

    oapl config show configs/tiny.yaml [key=value ...]   print the resolved config with field docs
    oapl train configs/tiny.yaml [key=value ...]         the main job (learners + fleet on this machine)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
