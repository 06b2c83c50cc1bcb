"""Offline rollout datasets: a JSONL round trip keeps token ids and log-probs exactly; a dataset that does
not match the run's sampling settings, or a broken line, fails with the file, the line and the field."""

import json
from types import SimpleNamespace

import pytest

from megatron_oapl.rollout.dataset import RolloutDataset, read_groups, write_groups
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


def _write_lines(path, lines: list[str]):
    path.write_text("".join(lines))
    return path


def test_lines_in_any_order_are_read_by_order_and_only_when_a_step_asks(tmp_path):
    """The dataset is an index of line offsets: opening it checks the first line only, and a step reads and
    checks just its own lines. A broken line among those no step has asked for yet is reported only when
    one does (the reader does not parse the whole file up front)."""
    from megatron_oapl.rollout.dataset import RolloutDataset, group_line

    groups = [_group(i) for i in range(5)]
    lines = [group_line(groups[i]) for i in (3, 0, 4, 1, 2)]
    lines[4] = '{"order_index": 2, "prompt": {"prompt_id": "p2", "token_ids": [1, 2'  # cut short, then more
    lines[4] += "\n"
    data = RolloutDataset(_write_lines(tmp_path / "d.jsonl", lines), FLEET)
    assert len(data) == 5
    assert [data.group(i) for i in (0, 1, 3, 4)] == [groups[i] for i in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match=r"d.jsonl:5: not a rollout group"):
        data.group(2)


def test_an_unfinished_dataset_is_refused_with_what_to_do(tmp_path):
    """Each order once, none missing, no line torn by a kill: otherwise one error naming the file."""
    from megatron_oapl.rollout.dataset import RolloutDataset, group_line, orders_on_disk

    lines = [group_line(_group(i)) for i in range(3)]
    with pytest.raises(ValueError, match=r"d.jsonl:3: order 0 is also on line 1"):
        RolloutDataset(_write_lines(tmp_path / "d.jsonl", [*lines[:2], lines[0]]), FLEET)
    with pytest.raises(ValueError, match=r"orders 1 are missing .*run the same command again"):
        RolloutDataset(_write_lines(tmp_path / "e.jsonl", [lines[0], lines[2], group_line(_group(3))]), FLEET)
    torn = _write_lines(tmp_path / "f.jsonl", [*lines, lines[0][:30]])
    with pytest.raises(ValueError, match=r"f.jsonl: the last line is incomplete"):
        RolloutDataset(torn, FLEET)
    # `oapl generate` resuming on it: the torn line is cut off, the complete ones count as done.
    assert orders_on_disk(torn, FLEET) == {0, 1, 2}
    assert torn.read_text() == "".join(lines)
    assert [g.order_index for g in read_groups(torn, FLEET)] == [0, 1, 2]


def _with_line_2(tmp_path, change):
    """A 3-group dataset whose second line is valid JSON with `change(record)` applied."""
    path = write_groups(tmp_path / "d.jsonl", [_group(0), _group(1), _group(2)])
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    change(record)
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda r: r["samples"][1]["token_ids"].__setitem__(1, "7"),
     r"d.jsonl:2: samples\[1\].token_ids\[1\] is '7' \(str\): token ids must be ints in \[0, 10\)"),
    (lambda r: r["prompt"]["token_ids"].__setitem__(0, 10),
     r"d.jsonl:2: prompt.token_ids\[0\] is 10 \(int\): token ids must be ints in \[0, 10\)"),
    (lambda r: r["samples"][0]["logprobs"].pop(),
     r"d.jsonl:2: samples\[0\].logprobs must be a list of one log-prob per token \(3 tokens\), got 2 entries"),
    (lambda r: r["samples"][0]["logprobs"].__setitem__(0, None),
     r"d.jsonl:2: samples\[0\].logprobs\[0\] is None: log-probs must be finite numbers"),
    (lambda r: r["samples"][1].__setitem__("reward", "1.0"),
     r"d.jsonl:2: samples\[1\].reward must be a finite number, got '1.0'"),
    (lambda r: r.__setitem__("samples", "none"), r"d.jsonl:2: not a rollout group"),
])
def test_the_pre_flight_refuses_a_wrong_typed_line_with_file_and_line(tmp_path, change, message):
    """Valid JSON of the wrong type on a line other than the first: before, only the first line was checked
    at start and a rank died later with `ValueError: too many dimensions 'str'` and no file:line."""
    data = RolloutDataset(_with_line_2(tmp_path, change), FLEET, vocab_size=10)  # opening checks line 1 only
    with pytest.raises(ValueError, match=message):
        data.check_every_line()
    with pytest.raises(ValueError, match=message):  # and a step reading it names it too
        data.group(1)


def test_the_pre_flight_passes_a_valid_dataset(tmp_path):
    data = RolloutDataset(write_groups(tmp_path / "d.jsonl", [_group(0), _group(1)]), FLEET, vocab_size=10)
    data.check_every_line()
    assert data.group(1) == _group(1)
