"""`oapl data prepare`: Hugging Face math and code datasets -> the train/eval files `data.path` reads.

    # math: DeepScaleR-like problem/answer rows for training, the paper's four math benchmarks for evaluation
    oapl data prepare math --train hf/DeepScaleR-Preview-Dataset --bench aime25 --bench hmmt25_feb \\
        --bench hmmt25_nov --bench brumo25 --out data/math
    # code: DeepCoder-like problem + stdin/stdout tests (several subsets), LiveCodeBench v5 for evaluation
    oapl data prepare code --train hf/DeepCoder/primeintellect@train --train hf/DeepCoder/taco@train \\
        --bench lcb_v5 --out data/code

A SOURCE is a local file or directory (download a Hub dataset first, e.g.
`hf download --repo-type dataset agentica-org/DeepScaleR-Preview-Dataset --local-dir hf/DeepScaleR-Preview-Dataset`;
a `datasets` object in Python: `ds.to_parquet(PATH)`):
- a file: .parquet, .jsonl, .json (a list of objects, or JSON lines as `datasets` writes them), .arrow
  (Arrow IPC, as in a `save_to_disk` directory);
- a directory: its data files (recursively, hidden folders skipped); `DIR@SPLIT` keeps those named
  `SPLIT-*` / `SPLIT.*` or under a folder named SPLIT (Hub snapshots and `save_to_disk` dataset dicts).

Columns (found by name, or given with --prompt-column / --answer-column / --tests-column):
- prompt: `prompt` | `problem` | `question` (a chat message list: its last user message);
- math answer: `answer` | `final_answer` (numbers become text);
- code tests: `tests` | `test_cases` | `input_output`: a list (or JSON text of a list) of
  {"input", "output"[, "testtype"]}, or APPS/TACO's {"inputs": [...], "outputs": [...]}. Only stdin/stdout
  cases are kept (the `code` reward runs programs on stdin): function-call cases (`testtype` other than
  stdin, or an `fn_name`) are dropped, and a problem left without tests is dropped.

Benchmarks (`--bench NAME[=SOURCE]`, `data/benchmarks.py`: aime25, hmmt25_feb, hmmt25_nov, brumo25 for math,
lcb_v5 for code) are fetched from the Hugging Face hub (or read from a local SOURCE) and written one file
each, `DIR/NAME.parquet`, for `eval.sets` (the command prints the entries); --eval / --eval-size are then
optional. Their questions are held out of the training rows like --eval's.

Written (`--out DIR`): `DIR/train.parquet` and `DIR/eval.parquet` (or .jsonl with --format jsonl), records
{"prompt", "answer", "metadata"} as `megatron_oapl.data.prompts` reads them; code problems carry
metadata["tests"], every record metadata["source"] / ["row"] (where it came from). The prompt is the
question followed by --instruction (a task default: where to put the final answer / the program). The
training rows are shuffled (--seed; `data.num_train_prompts` then takes a random subset) and training
questions that also occur in the eval set (same words, case and spacing ignored) are dropped. Without
--eval, --eval-size N holds out N training rows. Rows without a question, an answer or tests are skipped
and counted by reason. Point the config at the result: `data.source=parquet data.path=DIR/{split}.parquet`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from megatron_oapl.data.benchmarks import BENCHMARKS, Benchmark, BenchmarkError, bench_source, parse_bench

__all__ = ["PrepareError", "TASKS", "Summary", "read_source", "normalize_tests", "prepare", "add_data_parser"]

TASKS = ("math", "code")
FORMATS = ("parquet", "jsonl")
PROMPT_COLUMNS = ("prompt", "problem", "question")
ANSWER_COLUMNS = ("answer", "final_answer")
TESTS_COLUMNS = ("tests", "test_cases", "input_output")
INSTRUCTIONS = {
    "math": "Reason step by step, then give the final answer in \\boxed{}.",
    "code": ("Write a complete Python 3 program that reads the input from standard input and prints the "
             "answer to standard output. Give the program in a ```python code block at the end."),
}
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}  # `save_to_disk` bookkeeping
_SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


class PrepareError(ValueError):
    """The sources or options cannot give a dataset; the message names the source, file or option."""


# --------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[Path, str | None]:
    """`PATH` or `PATH@SPLIT` (a path that exists as written wins, '@' included)."""
    if Path(spec).exists() or "@" not in spec:
        return Path(spec), None
    path, _, split = spec.rpartition("@")
    return Path(path), split or None


def _split_of(name: str) -> str | None:
    match = re.match(r"([a-z]+)(?:[-_.]|$)", name.lower())
    return match.group(1) if match and match.group(1) in _SPLIT_NAMES else None


def source_files(spec: str) -> list[Path]:
    """The data files a SOURCE names (see the module docstring)."""
    path, split = _parse_spec(spec)
    if path.is_file():
        if split:
            raise PrepareError(f"{spec}: @{split} selects files of a directory, but {path} is a file")
        return [path]
    if not path.is_dir():
        raise PrepareError(f"{spec}: no such file or directory (download a Hub dataset first: "
                           "hf download --repo-type dataset ID --local-dir DIR)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES
                   and p.name not in _METADATA_FILES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if split:
        files = [p for p in files if _split_of(p.name) == split or split in p.relative_to(path).parts[:-1]]
    elif len(found := {s for p in files for s in [_split_of(p.name)] if s}) > 1:
        raise PrepareError(f"{spec}: the directory holds several splits ({', '.join(sorted(found))}); "
                           f"name one: {spec}@SPLIT")
    if not files:
        what = f"named {split}-* / {split}.* or under a {split}/ folder" if split else "at all"
        raise PrepareError(f"{spec}: no {', '.join(_DATA_SUFFIXES)} files {what} in {path}")
    return files


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name (what `Dataset.to_json` writes)
        if isinstance(data, list):
            yield from ((f"{path} item {i}", row) for i, row in enumerate(data))
            return
        if data is not None and not isinstance(data, dict):
            raise PrepareError(f"{path}: a .json source must hold a list of objects (or JSON lines)")
        if isinstance(data, dict):
            yield f"{path}", data
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: invalid JSON ({e})") from None


def _read_arrow_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        with pa.memory_map(str(path)) as source:
            try:  # `datasets` writes the streaming format; also accept the file format
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepareError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from None


def read_source(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a SOURCE, in file order; `where` names the file and row/line."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for path in source_files(spec):
        if path.suffix in (".parquet", ".arrow"):
            table = _read_arrow_table(path)
            rows += [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]
        else:
            rows += list(_read_json(path))
    for where, row in rows:
        if not isinstance(row, dict):
            raise PrepareError(f"{where}: a row must be an object, got {type(row).__name__}")
    return rows


# --------------------------------------------------------------------------------------------------
# Rows -> records
# --------------------------------------------------------------------------------------------------


def _column(rows: list[tuple[str, dict]], spec: str, given: str | None, candidates: tuple[str, ...],
            option: str) -> str:
    keys = list(dict.fromkeys(k for _, row in rows[:100] for k in row))
    if given is not None:
        if given not in keys:
            raise PrepareError(f"{option}={given}: {spec} has no such column (columns: {', '.join(keys)})")
        return given
    found = next((c for c in candidates if c in keys), None)
    if found is None:
        raise PrepareError(f"{spec}: none of the columns {', '.join(candidates)} is there (columns: "
                           f"{', '.join(keys) or 'none'}); name it with {option}")
    return found


def _question(value: Any) -> str | None:
    if isinstance(value, list):  # chat messages: the last user turn
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def normalize_tests(value: Any) -> tuple[list[dict[str, str]], str | None]:
    """(stdin/stdout cases as {"input", "output"} strings, why none are usable or None)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [], "tests are not valid JSON"
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:  # APPS / TACO layout
        if value.get("fn_name"):
            return [], "function-call tests only"
        value = [{"input": i, "output": o} for i, o in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, list):
        return [], "tests are not a list"
    cases, functional = [], 0
    for case in value:
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            return [], "a test case without input/output"
        if str(case.get("testtype") or "stdin").lower() != "stdin":
            functional += 1
            continue
        cases.append({"input": _text(case["input"]), "output": _text(case["output"])})
    if not cases:
        return [], "function-call tests only" if functional else "no test cases"
    return cases, None


@dataclass
class Summary:
    """What `prepare` wrote and what it left out."""

    files: dict[str, Path] = field(default_factory=dict)  # split -> file
    counts: dict[str, int] = field(default_factory=dict)  # split -> records written
    skipped: dict[str, tuple[int, str]] = field(default_factory=dict)  # reason -> (rows, first where)
    overlap: int = 0  # training rows dropped because the eval set asks the same question

    def skip(self, reason: str, where: str) -> None:
        count, first = self.skipped.get(reason, (0, where))
        self.skipped[reason] = (count + 1, first)


def _records(task: str, specs: Iterable[str], columns: dict[str, str | None], instruction: str,
             max_tests: int | None, summary: Summary) -> list[tuple[str, dict[str, Any]]]:
    """(normalized question, record) of every usable row of `specs`."""
    out = []
    for spec in specs:
        rows = read_source(spec)
        if not rows:
            raise PrepareError(f"{spec}: no rows")
        prompt_col = _column(rows, spec, columns["prompt"], PROMPT_COLUMNS, "--prompt-column")
        if task == "math":
            extra_col = _column(rows, spec, columns["answer"], ANSWER_COLUMNS, "--answer-column")
        else:
            extra_col = _column(rows, spec, columns["tests"], TESTS_COLUMNS, "--tests-column")
        label = spec.rstrip("/")
        for row_index, (where, row) in enumerate(rows):
            question = _question(row.get(prompt_col))
            if question is None:
                summary.skip(f"no {prompt_col}", where)
                continue
            meta: dict[str, Any] = {"source": label, "row": row_index}
            answer = None
            if task == "math":
                raw = row.get(extra_col)
                answer = None if raw is None or isinstance(raw, bool) else str(raw).strip()
                if not answer:
                    summary.skip(f"no {extra_col}", where)
                    continue
            else:
                tests, why = normalize_tests(row.get(extra_col))
                if why:
                    summary.skip(why, where)
                    continue
                meta["tests"] = tests[:max_tests] if max_tests else tests
            prompt = f"{question}\n\n{instruction}" if instruction else question
            out.append((" ".join(question.lower().split()),
                        {"prompt": prompt, "answer": answer, "metadata": meta}))
    return out


def _bench_sets(task: str, benches: Iterable[str]) -> list[tuple[Benchmark, str | None]]:
    """(benchmark, local source or None) of every --bench, checked against the task; each name once."""
    found = [parse_bench(spec, task) for spec in benches]
    names = [bench.name for bench, _ in found]
    if len(set(names)) < len(names):
        raise PrepareError(f"--bench names {sorted(n for n in set(names) if names.count(n) > 1)} more than once")
    return found


def _write(path: Path, records: list[dict[str, Any]], fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # metadata as JSON text: one string column whatever each row's mapping holds (the reader decodes it)
        table = pa.table({"prompt": pa.array([r["prompt"] for r in records], pa.string()),
                          "answer": pa.array([r["answer"] for r in records], pa.string()),
                          "metadata": pa.array([json.dumps(r["metadata"], ensure_ascii=False) for r in records],
                                               pa.string())})
        pq.write_table(table, tmp)
    os.replace(tmp, path)  # a crash leaves the old file (or none), never half of one


def prepare(task: str, train: list[str], out: str | Path, eval_sources: list[str] = (), *,
            eval_size: int = 0, benches: list[str] = (), fmt: str = "parquet", instruction: str | None = None,
            seed: int = 0, shuffle: bool = True, max_tests: int | None = None, prompt_column: str | None = None,
            answer_column: str | None = None, tests_column: str | None = None) -> Summary:
    """Read `train` / `eval_sources` / `benches`, write `out/{train,eval}.{fmt}` and `out/<bench>.{fmt}`; see
    the module docstring."""
    if task not in TASKS:
        raise PrepareError(f"task={task!r} must be one of: {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise PrepareError(f"--format={fmt} must be one of: {', '.join(FORMATS)}")
    if not train:
        raise PrepareError("--train: give at least one SOURCE")
    if eval_sources and eval_size:
        raise PrepareError(f"--eval-size={eval_size} holds out training rows; it cannot be combined with --eval")
    if not eval_sources and eval_size < 1 and not benches:
        raise PrepareError("give --eval SOURCE (an evaluation set), --eval-size N (hold out N training rows) "
                           "or --bench NAME (a benchmark as its own eval set)")
    if max_tests is not None and max_tests < 1:
        raise PrepareError(f"--max-tests={max_tests} must be >= 1")
    if task == "math" and tests_column or task == "code" and answer_column:
        opt = "--tests-column" if task == "math" else "--answer-column"
        raise PrepareError(f"{opt} does not apply to task {task}")
    columns = {"prompt": prompt_column, "answer": answer_column, "tests": tests_column}
    instruction = INSTRUCTIONS[task] if instruction is None else instruction.strip()
    summary = Summary()

    bench_sets = _bench_sets(task, benches)  # names first: a typo costs no download
    train_rows = _records(task, train, columns, instruction, max_tests, summary)
    if shuffle:
        random.Random(seed).shuffle(train_rows)
    eval_rows = []
    if eval_sources:
        eval_rows = _records(task, eval_sources, columns, instruction, max_tests, summary)
        if not eval_rows:
            raise PrepareError("no evaluation rows left: every --eval row was skipped")
    elif eval_size:
        if eval_size >= len(train_rows):
            raise PrepareError(f"--eval-size={eval_size} must be < the {len(train_rows)} usable training rows")
        eval_rows, train_rows = train_rows[:eval_size], train_rows[eval_size:]
    sets = {"eval": eval_rows} if eval_rows else {}
    for bench, source in bench_sets:
        # The benchmark's own columns (found by name): --prompt-column etc. describe the training sources.
        rows = _records(task, [bench_source(bench, source)], dict.fromkeys(columns), instruction, max_tests, summary)
        if not rows:
            raise PrepareError(f"--bench {bench.name}: no usable rows (see the skipped rows above)")
        for _, rec in rows:
            rec["metadata"]["benchmark"] = bench.name
        sets[bench.name] = rows
    asked = {key for rows in sets.values() for key, _ in rows}
    kept = [rec for key, rec in train_rows if key not in asked]
    summary.overlap = len(train_rows) - len(kept)
    if not kept:
        raise PrepareError("no training rows left (see the skipped rows above)")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in (("train", kept), *((name, [rec for _, rec in rows]) for name, rows in sets.items())):
        path = out / f"{split}.{fmt}"
        _write(path, records, fmt)
        summary.files[split], summary.counts[split] = path, len(records)
    return summary


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register `data` (with its `prepare` action) on the `oapl` command's subparsers."""
    data = subparsers.add_parser("data", help="build the train/eval prompt files of a run (oapl data prepare)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser("prepare", help="Hugging Face math / code datasets -> DIR/train.parquet + DIR/eval.parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS, help="math: question + answer (math reward); code: question + "
                   "stdin/stdout tests (code reward)")
    p.add_argument("--train", action="append", required=True, metavar="SOURCE",
                   help="training rows: a file or directory, DIR@SPLIT for one split (repeatable: concatenated)")
    p.add_argument("--eval", action="append", default=[], metavar="SOURCE",
                   help="evaluation rows (repeatable), e.g. an AIME set; or use --eval-size")
    p.add_argument("--eval-size", type=int, default=0, metavar="N",
                   help="without --eval: hold out N (shuffled) training rows for evaluation")
    p.add_argument("--bench", action="append", default=[], metavar="NAME[=SOURCE]",
                   help=f"a benchmark as its own eval set, DIR/NAME.* (repeatable): {', '.join(BENCHMARKS)}; "
                        "fetched from the Hugging Face hub, or read from a local SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (train.* and eval.*)")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="output format (default parquet)")
    p.add_argument("--instruction", help="text appended to every question (default: the task's; '' for none)")
    p.add_argument("--prompt-column", help=f"question column (default: the first of {', '.join(PROMPT_COLUMNS)})")
    p.add_argument("--answer-column", help=f"math answer column (default: {', '.join(ANSWER_COLUMNS)})")
    p.add_argument("--tests-column", help=f"code tests column (default: {', '.join(TESTS_COLUMNS)})")
    p.add_argument("--max-tests", type=int, help="keep at most N test cases per code problem (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training rows' shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the training rows in source order")
    p.set_defaults(func=run)
    return data


def run(args) -> int:
    """The `oapl data prepare` action: one `error:` line and exit 2 for bad sources or options."""
    try:
        summary = prepare(args.task, args.train, args.out, args.eval, eval_size=args.eval_size,
                          benches=args.bench, fmt=args.format,
                          instruction=args.instruction, seed=args.seed, shuffle=not args.no_shuffle,
                          max_tests=args.max_tests, prompt_column=args.prompt_column,
                          answer_column=args.answer_column, tests_column=args.tests_column)
    except (PrepareError, BenchmarkError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for reason, (count, first) in sorted(summary.skipped.items()):
        print(f"skipped {count} row(s): {reason} (first: {first})")
    if summary.overlap:
        print(f"dropped {summary.overlap} training row(s) whose question is in the eval set")
    for split, path in summary.files.items():
        print(f"wrote {path} ({summary.counts[split]} {split} prompts)")
    print(f"config: data.source={args.format} data.path={Path(args.out) / ('{split}.' + args.format)}")
    for spec in args.bench:
        bench = BENCHMARKS[spec.partition("=")[0].strip()]
        print(f"eval.sets.{bench.name}: {{source: file, path: {summary.files[bench.name]}, reward: {bench.reward}}}")
    return 0
