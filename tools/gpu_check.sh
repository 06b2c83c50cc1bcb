#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py does the work; see its docstring or docs/gpu-check.md).
#
#   tools/gpu_check.sh --prepare          here, before a device call: wheels for Python 3.12 + the tiny
#                                         model into runs/gpu-check/ (carried to the GPU machine)
#   tools/gpu_check.sh [--out DIR]        on the GPU machine: install them, run every check, print the table
#   tools/gpu_check.sh --list | --help
#
# Exit codes: 0 passed, 1 a check failed, 2 bad arguments, 3 no CUDA GPU (refused), 4 not prepared.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
