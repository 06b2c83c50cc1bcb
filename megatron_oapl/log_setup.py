"""Python logging for every process of a run: one stderr handler, lines prefixed with who wrote them.

    setup_logging()            # the CLI: "[oapl]", or "[rank N]" under torchrun / srun (RANK set)
    setup_logging("rank 1")    # a spawned learner rank;  setup_logging("engine 0") an engine process

    12:00:03 [rank 0] checkpoint: saved checkpoint runs/tiny/checkpoints/step_6 in 0.4 s
    12:00:03 [rank 1] WARNING checkpoint: received SIGTERM: will save a checkpoint at the end of this step

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


def default_label() -> str:
    rank = os.environ.get("RANK")
    return f"rank {rank}" if rank is not None else "oapl"


def setup_logging(label: str | None = None, level: int = logging.INFO) -> None:
    """Send log records to stderr as `HH:MM:SS [label] LEVEL logger: message` (INFO shows no level)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(label or default_label()))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    for name in _PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
