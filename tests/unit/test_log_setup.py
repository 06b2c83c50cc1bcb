"""Logging reaches the user: the project's INFO lines, prefixed with the process's role, once each; other
libraries' INFO stays quiet."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
from megatron_oapl.log_setup import setup_logging
setup_logging()
setup_logging()  # configured twice (CLI, then a rank's entry): still one line per record
logging.getLogger("oapl.checkpoint").info("saved checkpoint step_2")
logging.getLogger("megatron_oapl.data.prompts").warning("eval is not held out")
logging.getLogger("megatron.core.utils").info("a library's chatter")
"""


def test_project_info_lines_reach_stderr_with_the_rank():
    env = {**os.environ, "RANK": "3"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "[rank 3] checkpoint: saved checkpoint step_2",
        "[rank 3] WARNING data.prompts: eval is not held out",
    ], out.stderr


def test_records_follow_a_replaced_sys_stderr(monkeypatch):
    """pytest's capture and redirects swap sys.stderr after logging was set up: the lines follow the swap."""
    import io
    import logging

    from megatron_oapl.log_setup import setup_logging

    setup_logging("oapl")
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    logging.getLogger("oapl.cli").warning("does not fit (starting anyway: --force)")
    assert swapped.getvalue().endswith("[oapl] WARNING cli: does not fit (starting anyway: --force)\n")
