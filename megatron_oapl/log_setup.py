"""Python logging for every process of a run: one stderr handler, one formatter, lines prefixed with who
wrote them. Every module logs through `logging.getLogger(__name__)` (or an `oapl.*` name); no message
carries a hand-made `[oapl]` / `[fleet]` / `[study]` prefix: the label and the logger name say where.

    setup_logging()            # the CLI: "[oapl]", or "[rank N]" under torchrun / srun (RANK set)
    setup_logging("rank 1")    # a spawned learner rank;  setup_logging("engine 0") an engine process

    12:00:03 [rank 0] checkpoint: saved checkpoint runs/tiny/checkpoints/step_6 in 0.4 s
    12:00:03 [rank 1] WARNING checkpoint: received SIGTERM: will save a checkpoint at the end of this step

What goes where:
- log records (stderr, through this formatter): every status line a user reads while a command runs:
  progress of a step ("evaluating ...", "the data check ..."), warnings, why a run stopped and how to resume.
- print() to stdout: only a command's *result*, the lines a user or a script reads when it is done: tables
  (`oapl train`/`oapl eval`'s pass@k table, `oapl plan`'s memory table and its notes, a study's dry-run list),
  "wrote X" / "report: X", `oapl data prepare`'s summary and the config lines it suggests, the rendered SLURM
  script, `oapl config show`'s YAML, `oapl eval`'s pass@1 line and the final summary line of `oapl train`
  (`pass@1: a ± b -> c ± d (gain ...)`, quoted in README.md).
- print() to stderr: the one `error: ...` line of a user mistake (exit code 2, like argparse's own), the
  verdict of a check that is the command's answer (`oapl plan`'s "does not fit" line, `oapl launch slurm`'s
  `error:` / `warning:` lines and "nothing was submitted"), and a failed rank's traceback as the rank wrote it.
- tqdm: progress bars (stderr).

The project's loggers (`oapl.*`, `megatron_oapl.*`) show INFO and above; every other library keeps
Python's default of WARNING and above (Megatron-Core and transformers are chatty at INFO). Calling it
again replaces the handler it installed, so a process configures logging once whatever the path.
"""
from __future__ import annotations

import logging
import os
import sys

_PROJECT_LOGGERS = ("oapl", "megatron_oapl")
_MARK = "_oapl_handler"  # tags the handler installed here, so a second call replaces it


class _Formatter(logging.Formatter):
    def __init__(self, label: str):
        super().__init__(datefmt="%H:%M:%S")
        self.label = label

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        for prefix in _PROJECT_LOGGERS:  # "megatron_oapl.data.prompts" -> "data.prompts"
            if name.startswith(prefix + "."):
                name = name[len(prefix) + 1:]
                break
        level = "" if record.levelno == logging.INFO else f"{record.levelname} "
        line = f"{self.formatTime(record, self.datefmt)} [{self.label}] {level}{name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, not the stream of the call to
    `setup_logging`: code that swaps sys.stderr (pytest's capture, a redirect) still gets the lines."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ / setStream assign it; the property decides
        pass


def default_label() -> str:
    rank = os.environ.get("RANK")
    return f"rank {rank}" if rank is not None else "oapl"


def setup_logging(label: str | None = None, level: int = logging.INFO) -> None:
    """Send log records to stderr as `HH:MM:SS [label] LEVEL logger: message` (INFO shows no level)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(label or default_label()))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    for name in _PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
