"""`oapl data prepare` on small synthetic sets shaped like the paper's data: DeepScaleR-like problem/answer
rows (a JSON list file), AIME-like eval rows (a Hub-snapshot directory with test.jsonl), DeepCoder-like
problems with stdin/stdout tests (Parquet subsets, JSON-text tests, TACO's layout, function-call cases) and
an Arrow directory laid out as `datasets`' save_to_disk writes it. The written files are read back by the
project's own loader and scored by the real rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_oapl.cli import main
from megatron_oapl.config import DataConfig
from megatron_oapl.data.prepare import normalize_tests, prepare, read_source
from megatron_oapl.data.prompts import load_prompts

AIME = [{"id": "2025-I-1", "problem": "Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$.",
         "answer": 70},
        {"id": "2025-I-2", "problem": "What is $2^{10}$?", "answer": "1024"}]


def _math_sources(root: Path) -> tuple[str, str]:
    train = [{"problem": f"Compute ${i} + {i}$.", "answer": str(2 * i), "solution": "..."} for i in range(20)]
    train.append({"problem": "  what is $2^{10}$? ", "answer": "1024", "solution": "..."})  # an eval question
    train.append({"problem": "No answer given.", "answer": "", "solution": "..."})
    train.append({"problem": None, "answer": "3", "solution": "..."})
    (root / "deepscaler.json").write_text(json.dumps(train))
    aime = root / "aime25"
    aime.mkdir()
    (aime / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AIME))
    (aime / "README.md").write_text("not data")
    return str(root / "deepscaler.json"), f"{aime}@test"


def _data_cfg(out: Path, fmt: str = "parquet", **kw) -> DataConfig:
    return DataConfig(source=fmt, path=str(out / f"{{split}}.{fmt}"), **{"num_train_prompts": 1000,
                                                                         "num_eval_prompts": 1000, **kw})


def test_math_sets_become_held_out_train_and_eval_files(tmp_path):
    from megatron_oapl.rewards.math import math_reward

    train_src, eval_src = _math_sources(tmp_path)
    summary = prepare("math", [train_src], tmp_path / "out", [eval_src])
    assert summary.counts == {"train": 20, "eval": 2} and summary.overlap == 1
    assert summary.skipped["no answer"][0] == 1 and summary.skipped["no problem"][0] == 1
    assert summary.skipped["no answer"][1] == f"{train_src} item 21"  # names the file and the row

    train = load_prompts(_data_cfg(tmp_path / "out"), "train")
    held_out = load_prompts(_data_cfg(tmp_path / "out"), "eval")
    assert [p.answer for p in held_out] == ["70", "1024"]
    assert held_out[0].text.startswith(AIME[0]["problem"]) and "\\boxed{}" in held_out[0].text
    assert held_out[0].metadata == {"source": eval_src, "row": 0}
    assert not any("2^{10}" in p.text for p in train)  # the eval question was dropped from training
    assert sorted(int(p.answer) for p in train) == [2 * i for i in range(20)]
    assert [p.answer for p in train] != [str(2 * i) for i in range(20)]  # shuffled (seed 0) ...
    again = prepare("math", [train_src], tmp_path / "again", [eval_src])  # ... the same way every time
    assert load_prompts(_data_cfg(tmp_path / "again"), "train") == train and again.counts == summary.counts
    first = train[0]
    assert math_reward(f"so the answer is \\boxed{{{first.answer}}}", first) == 1.0
    assert math_reward("so the answer is \\boxed{-1}", first) == 0.0


def _code_rows() -> list[dict]:
    stdin = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
             {"input": "5 7\n", "output": "12\n", "testtype": "stdin"},
             {"input": "f(1, 2)", "output": "3", "testtype": "functional"}]  # dropped: not stdin
    return [
        {"problem": "Read two integers and print their sum.", "tests": json.dumps(stdin)},
        {"problem": "Print the input reversed.",  # TACO layout, list-valued input lines
         "tests": json.dumps({"inputs": [["ab", ""]], "outputs": ["ba\n"]})},
        {"problem": "Implement f.", "tests": json.dumps({"inputs": ["1"], "outputs": ["1"], "fn_name": "f"})},
        {"problem": "Broken.", "tests": "[{"},
    ]


def test_code_sets_keep_stdin_tests_the_code_reward_runs(tmp_path):
    from megatron_oapl.rewards.code import code_reward

    snapshot = tmp_path / "DeepCoder"  # as `hf download --repo-type dataset` lays out a multi-subset dataset
    (snapshot / "primeintellect").mkdir(parents=True)
    (snapshot / "lcbv5").mkdir()
    pq.write_table(pa.Table.from_pylist(_code_rows()), snapshot / "primeintellect" / "train-00000-of-00001.parquet")
    extra = [{"problem": f"Print {i}.", "tests": json.dumps([{"input": "", "output": f"{i}\n"}])} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(extra), snapshot / "lcbv5" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_code_rows()[:1]), snapshot / "lcbv5" / "test-00000-of-00001.parquet")

    summary = prepare("code", [f"{snapshot}/primeintellect@train", f"{snapshot}/lcbv5@train"], tmp_path / "out",
                      [f"{snapshot}/lcbv5@test"], fmt="jsonl", shuffle=False)
    # The eval question "Read two integers..." is dropped from training; function-call-only and broken rows
    # are skipped and counted.
    assert summary.counts == {"train": 4, "eval": 1} and summary.overlap == 1
    assert {r: n for r, (n, _) in summary.skipped.items()} == {"function-call tests only": 1,
                                                               "tests are not valid JSON": 1}
    train = load_prompts(_data_cfg(tmp_path / "out", "jsonl"), "train")
    held_out = load_prompts(_data_cfg(tmp_path / "out", "jsonl"), "eval")
    assert held_out[0].metadata["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"}]
    assert held_out[0].answer is None and "```python" in held_out[0].text
    assert train[0].metadata["tests"] == [{"input": "ab\n", "output": "ba\n"}]
    add = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert code_reward(add, held_out[0]) == 1.0
    assert code_reward("```python\nprint(0)\n```", held_out[0]) == 0.0
    assert code_reward("```python\nprint(input()[::-1])\n```", train[0]) == 1.0


def test_arrow_save_to_disk_directory_and_eval_size(tmp_path):
    """A DatasetDict directory as `datasets` writes it (Arrow IPC streams under one folder per split), and
    --eval-size holding out training rows when there is no eval set."""
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (ds / "train" / "state.json").write_text("{}")
    (ds / "train" / "dataset_info.json").write_text("{}")
    table = pa.table({"question": [f"q{i}" for i in range(10)], "final_answer": [str(i) for i in range(10)]})
    with pa.OSFile(str(ds / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert [row["question"] for _, row in read_source(f"{ds}@train")] == [f"q{i}" for i in range(10)]
    summary = prepare("math", [f"{ds}@train"], tmp_path / "out", eval_size=3, instruction="")
    assert summary.counts == {"train": 7, "eval": 3}
    train = load_prompts(_data_cfg(tmp_path / "out"), "train")
    held_out = load_prompts(_data_cfg(tmp_path / "out"), "eval")
    assert sorted(p.text for p in train + held_out) == sorted(f"q{i}" for i in range(10))  # no instruction
    assert not {p.text for p in train} & {p.text for p in held_out}


def test_normalize_tests_layouts():
    assert normalize_tests([{"input": 1, "output": 2}]) == ([{"input": "1", "output": "2"}], None)
    assert normalize_tests({"inputs": ["x"], "outputs": ["y"]}) == ([{"input": "x", "output": "y"}], None)
    assert normalize_tests([{"input": "x"}]) == ([], "a test case without input/output")
    assert normalize_tests([{"input": "f()", "output": "1", "testtype": "functional"}]) == (
        [], "function-call tests only")
    assert normalize_tests(None) == ([], "tests are not a list")


@pytest.mark.parametrize("argv, message", [
    (["--train", "{tmp}/missing.json", "--eval-size", "1"], "{tmp}/missing.json: no such file or directory"),
    (["--train", "{tmp}/aime25", "--eval-size", "1"], "{tmp}/aime25: the directory holds several splits "
                                                      "(test, train); name one: {tmp}/aime25@SPLIT"),
    (["--train", "{tmp}/aime25@dev", "--eval-size", "1"], "{tmp}/aime25@dev: no .parquet, .jsonl, .json, "
                                                          ".arrow files named dev-*"),
    (["--train", "{tmp}/aime25@train"], "give --eval SOURCE (an evaluation set) or --eval-size N"),
    (["--train", "{tmp}/aime25@train", "--eval-size", "1", "--prompt-column", "text"],
     "--prompt-column=text: {tmp}/aime25@train has no such column (columns: problem, answer)"),
    (["--train", "{tmp}/aime25@train", "--eval-size", "1", "--tests-column", "t"],
     "--tests-column does not apply to task math"),
])
def test_cli_errors_are_one_line_naming_the_option(tmp_path, capsys, argv, message):
    aime = tmp_path / "aime25"
    aime.mkdir()
    (aime / "test.jsonl").write_text(json.dumps(AIME[0]) + "\n")
    (aime / "train.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["data", "prepare", "math", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {message.replace('{tmp}', str(tmp_path))}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_config_to_use(tmp_path, capsys):
    train_src, eval_src = _math_sources(tmp_path)
    rc = main(["data", "prepare", "math", "--train", train_src, "--eval", eval_src, "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"wrote {tmp_path / 'm' / 'train.parquet'} (20 train prompts)" in out
    assert "dropped 1 training row(s) whose question is in the eval set" in out
    assert f"skipped 1 row(s): no answer (first: {train_src} item 21)" in out
    assert out.rstrip().endswith(f"config: data.source=parquet data.path={tmp_path / 'm'}/{{split}}.parquet")
