"""`oapl data prepare` on small synthetic sets shaped like the paper's data: DeepScaleR-like problem/answer
rows (a JSON list file), AIME-like eval rows (a Hub-snapshot directory with test.jsonl), DeepCoder-like
problems with stdin/stdout tests (Parquet subsets, JSON-text tests, TACO's layout, function-call cases) and
an Arrow directory laid out as `datasets`' save_to_disk writes it. The written files are read back by the
project's own loader and scored by the real rewards."""

from __future__ import annotations

import json
import os
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
    (["--train", "{tmp}/aime25@train"], "give --eval SOURCE (an evaluation set), --eval-size N"),
    (["--train", "{tmp}/aime25@train", "--bench", "aime24"],
     "--bench aime24: not a known benchmark (allowed: aime25, hmmt25_feb, hmmt25_nov, brumo25, lcb_v5)"),
    (["--train", "{tmp}/aime25@train", "--bench", "lcb_v5"],
     "--bench lcb_v5 is a code benchmark; `oapl data prepare math` takes aime25, hmmt25_feb, hmmt25_nov, brumo25"),
    (["--train", "{tmp}/aime25@train", "--bench", "aime25=", "--eval-size", "1"],
     "--bench aime25=: give a SOURCE after '='"),
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


MATHARENA = {  # MathArena's layout: one `train` split of problem_idx / problem / answer (answers as text)
    "aime25": [{"problem_idx": 1, "problem": AIME[0]["problem"], "answer": "70"},
               {"problem_idx": 2, "problem": "What is $2^{10}$?", "answer": "1024"}],
    "hmmt25_feb": [{"problem_idx": 1, "problem": "Compute $\\frac{1}{2} + \\frac{1}{3}$.", "answer": "\\frac{5}{6}"}],
}


def _parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_benchmarks_from_the_hub_cache_become_eval_sets_with_their_checkers(tmp_path):
    """`--bench NAME` resolves the benchmark through huggingface_hub (offline here: the files are in the
    cache as `hf download` leaves them) and writes one eval set per benchmark, held out of training; the
    printed eval.sets entries load through the run's own reader and score with the named checker."""
    import subprocess
    import sys

    from megatron_oapl.config import load_config
    from megatron_oapl.data.benchmarks import BENCHMARKS
    from megatron_oapl.data.prompts import load_split
    from megatron_oapl.rewards.math import math_reward
    from tests.support.hub_cache import populate_cache

    cache = tmp_path / "hub"
    for name, rows in MATHARENA.items():
        populate_cache(cache, BENCHMARKS[name].repo_id, {"data/train-00000-of-00001.parquet": _parquet_bytes(rows),
                                                         "README.md": b"card"}, repo_type="dataset")
    train_src, _ = _math_sources(tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "megatron_oapl.cli", "data", "prepare", "math", "--train", train_src,
           "--bench", "aime25", "--bench", "hmmt25_feb", "--out", str(tmp_path / "math"), "--format", "jsonl"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dropped 1 training row(s) whose question is in the eval set" in done.stdout  # $2^{10}$ of aime25
    entries = [line for line in done.stdout.splitlines() if line.startswith("eval.sets.")]
    assert entries == [f"eval.sets.aime25: {{source: file, path: {tmp_path / 'math' / 'aime25.jsonl'}, reward: math}}",
                       f"eval.sets.hmmt25_feb: {{source: file, path: {tmp_path / 'math' / 'hmmt25_feb.jsonl'}, "
                       "reward: math}"]
    assert not (tmp_path / "math" / "eval.jsonl").exists()  # the benchmarks are the eval sets

    sets = ", ".join(line.removeprefix("eval.sets.") for line in entries)
    cfg = load_config(None, [f"eval.sets={{{sets}}}"], check_hardware=False)
    aime, hmmt = load_split(cfg, "eval/aime25"), load_split(cfg, "eval/hmmt25_feb")
    assert [p.answer for p in aime] == ["70", "1024"] and aime[0].metadata["benchmark"] == "aime25"
    assert math_reward("so \\boxed{70}", aime[0]) == 1.0 and math_reward("so \\boxed{71}", aime[0]) == 0.0
    assert math_reward("the sum is \\boxed{\\frac{10}{12}}", hmmt[0]) == 1.0  # math-verify: equal values

    # A benchmark the cache lacks, offline: one line saying how to give a local copy.
    cmd[cmd.index("hmmt25_feb")] = "brumo25"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --bench brumo25: MathArena/brumo_2025 is neither in the local Hugging "
                                  "Face cache nor downloadable here") and "--bench brumo25=DIR" in done.stderr


def test_a_local_lcb_copy_is_the_code_eval_set(tmp_path):
    from megatron_oapl.rewards.code import code_reward

    snapshot = tmp_path / "DeepCoder"
    (snapshot / "lcbv5").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_code_rows()), snapshot / "lcbv5" / "test-00000-of-00001.parquet")
    train = [{"problem": f"Print {i}.", "tests": json.dumps([{"input": "", "output": f"{i}\n"}])} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    summary = prepare("code", [str(tmp_path / "train.jsonl")], tmp_path / "code",
                      benches=[f"lcb_v5={snapshot}/lcbv5@test"], fmt="jsonl")
    assert summary.counts == {"train": 3, "lcb_v5": 2}  # function-call-only and broken rows skipped
    lcb = [json.loads(line) for line in (tmp_path / "code" / "lcb_v5.jsonl").read_text().splitlines()]
    assert lcb[0]["metadata"]["benchmark"] == "lcb_v5"
    from megatron_oapl.rollout.types import Prompt

    prompt = Prompt("lcb/0", [], text=lcb[0]["prompt"], answer=None, metadata=lcb[0]["metadata"])
    assert code_reward("```python\na, b = map(int, input().split())\nprint(a + b)\n```", prompt) == 1.0
