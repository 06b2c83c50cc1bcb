"""The paper's evaluation benchmarks by name: where each lives on the Hugging Face hub, which task (and so
which answer checker) it belongs to, and how to get its rows onto this machine.

    oapl data prepare math --train hf/DeepScaleR-Preview-Dataset --bench aime25 --bench hmmt25_feb \\
        --bench hmmt25_nov --bench brumo25 --out data/math      # -> data/math/{train,aime25,...}.parquet
    oapl data prepare code --train ... --bench lcb_v5=hf/DeepCoder/lcbv5@test --out data/code  # a local copy

`--bench NAME` downloads the benchmark's files into the Hugging Face cache (huggingface_hub's
`snapshot_download`, only the files of its split; HF_HUB_OFFLINE=1 uses what the cache holds) and
`--bench NAME=SOURCE` reads a local copy instead (any SOURCE `oapl data prepare` reads). Each prepared
benchmark is one eval set: `eval.sets.NAME: {source: file, path: DIR/NAME.parquet, reward: <checker>}`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Benchmark", "BenchmarkError", "BENCHMARKS", "benchmark", "parse_bench", "bench_source"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # "math" (question + final answer) | "code" (question + stdin/stdout tests)
    repo_id: str  # a dataset repository on the hub
    files: str  # the split's files inside it (a glob `snapshot_download` fetches)
    split: str | None  # `DIR@SPLIT` selection of those files (None: every data file fetched)
    reward: str  # the answer checker (a registered reward)
    about: str


# MathArena publishes each competition as one `train` split (columns problem_idx, problem, answer);
# DeepCoder's lcbv5 subset is LiveCodeBench v5's problems with their tests as JSON text.
BENCHMARKS = {b.name: b for b in (
    Benchmark("aime25", "math", "MathArena/aime_2025", "data/train-*", "train", "math", "AIME 2025 I + II, 30 problems"),
    Benchmark("hmmt25_feb", "math", "MathArena/hmmt_feb_2025", "data/train-*", "train", "math",
              "HMMT February 2025, 30 problems"),
    Benchmark("hmmt25_nov", "math", "MathArena/hmmt_nov_2025", "data/train-*", "train", "math",
              "HMMT November 2025"),
    Benchmark("brumo25", "math", "MathArena/brumo_2025", "data/train-*", "train", "math", "BRUMO 2025, 30 problems"),
    Benchmark("lcb_v5", "code", "agentica-org/DeepCoder-Preview-Dataset", "lcbv5/test-*", "test", "code",
              "LiveCodeBench v5 test problems (stdin/stdout ones: the code reward runs programs on stdin)"),
)}


class BenchmarkError(ValueError):
    """A benchmark cannot be named or fetched; the message names the option and the benchmark."""


def benchmark(name: str, task: str) -> Benchmark:
    """The catalog entry of `name`, which must belong to `task` (its answer checker must fit the run)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"--bench {name}: not a known benchmark (allowed: {', '.join(BENCHMARKS)})")
    bench = BENCHMARKS[name]
    if bench.task != task:
        others = [b.name for b in BENCHMARKS.values() if b.task == task]
        raise BenchmarkError(f"--bench {name} is a {bench.task} benchmark; `oapl data prepare {task}` takes "
                             f"{', '.join(others)}")
    return bench


def parse_bench(spec: str, task: str) -> tuple[Benchmark, str | None]:
    """`NAME` (from the hub) or `NAME=SOURCE` (a local copy) -> (benchmark, source or None)."""
    name, sep, source = spec.partition("=")
    if sep and not source:
        raise BenchmarkError(f"--bench {spec}: give a SOURCE after '=' (or only the name, to fetch it from the hub)")
    return benchmark(name.strip(), task), source or None


def bench_source(bench: Benchmark, source: str | None) -> str:
    """A SOURCE `prepare.read_source` reads: the local copy as given, or the hub files in the local cache
    (downloaded first unless HF_HUB_OFFLINE is set)."""
    if source is not None:
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(bench.repo_id, repo_type="dataset", allow_patterns=[bench.files])
    except LocalEntryNotFoundError as err:
        raise BenchmarkError(f"--bench {bench.name}: {bench.repo_id} is neither in the local Hugging Face cache "
                             f"nor downloadable here ({str(err).splitlines()[0]}); download it elsewhere and "
                             f"give --bench {bench.name}=DIR") from None
    except Exception as err:  # noqa: BLE001 - hub errors (auth, missing repo, network) become one line
        raise BenchmarkError(f"--bench {bench.name}: fetching {bench.repo_id} failed: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return f"{folder}@{bench.split}" if bench.split else folder
