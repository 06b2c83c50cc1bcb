"""Offline rollout datasets: a JSONL round trip keeps token ids and log-probs exactly; a dataset that does
not match the run's sampling settings, or a broken line, fails with the file, the line and the field."""

import json
from types import SimpleNamespace

import pytest

from megatron_oapl.rollout.dataset import read_groups, write_groups
from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample

FLEET = SimpleNamespace(temperature=1.0, top_p=1.0, group_size=2)


def _group(i: int, temperature: float = 1.0) -> RolloutGroup:
    samples = [Sample([5, 6, 3], [-0.25, -1.5, -0.125], "stop", " 11", 1.0),
               Sample([7, 7], [-2.0, -0.5], "length", " 77", 0.0)]
    return RolloutGroup(Prompt(f"p{i}", [1, 2, 3], "2 + 9 =", "11", {"task": "chain_sum"}), samples, 0,
                        temperature, 1.0, engine_id=1, order_index=i)


def test_round_trip_is_exact(tmp_path):
    groups = [_group(0), _group(1)]
    path = write_groups(tmp_path / "d.jsonl", groups)
    assert read_groups(path, FLEET) == groups
    assert not (tmp_path / "d.jsonl.tmp").exists()


def test_mismatches_name_the_line_and_the_field(tmp_path):
    path = write_groups(tmp_path / "d.jsonl", [_group(0), _group(1, temperature=0.7)])
    with pytest.raises(ValueError, match=r"d.jsonl:2: temperature 0.7 != 1.0 \(fleet.temperature\)"):
        read_groups(path, FLEET)
    with pytest.raises(ValueError, match=r"group size 2 != 4 \(fleet.group_size\)"):
        read_groups(write_groups(tmp_path / "e.jsonl", [_group(0)]), SimpleNamespace(**{**vars(FLEET), "group_size": 4}))
    lines = (tmp_path / "e.jsonl").read_text() + json.dumps({"order_index": 1}) + "\n"
    (tmp_path / "f.jsonl").write_text(lines)
    with pytest.raises(ValueError, match=r"f.jsonl:2: not a rollout group"):
        read_groups(tmp_path / "f.jsonl", FLEET)
    with pytest.raises(ValueError, match="line i must hold order i"):
        write_groups(tmp_path / "g.jsonl", [_group(1)])
    with pytest.raises(FileNotFoundError, match="oapl generate"):
        read_groups(tmp_path / "missing.jsonl", FLEET)
