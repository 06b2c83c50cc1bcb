"""Timeouts of the GPU review's C8 and C9, checked where a CPU can show them:
- C9: a fleet node waiting for the coordinator gives up after fleet.start_timeout_s (a cold vLLM start takes
  minutes), not after the weight push's fleet.weight_sync.timeout_s, and says which field bounds the wait;
- C8: the weight group's own process-group timeout exceeds the graceful abort deadline, so the NCCL watchdog
  (which tears the process down) never fires before every member has aborted cleanly."""

from __future__ import annotations

import datetime
from pathlib import Path

from megatron_oapl.rollout import fleet_node
from megatron_oapl.weights.transport import collective_timeout

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_fleet_node_waits_for_the_coordinator_for_start_timeout_s(tmp_path, capsys):
    code = fleet_node.main([str(TINY), f"run_dir={tmp_path}", "model.hf_path=null", "fleet.external=true",
                            "fleet.start_timeout_s=1", "fleet.weight_sync.timeout_s=300", "--engines", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "within 1 s (fleet.start_timeout_s)" in err, err


def test_weight_group_timeout_exceeds_the_abort_deadline():
    for deadline_s in (1.0, 300.0, 1800.0):
        timeout = collective_timeout(deadline_s)
        assert timeout >= datetime.timedelta(seconds=2 * deadline_s + 60), (deadline_s, timeout)
