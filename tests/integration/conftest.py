import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.oapl_case import make_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(directory with ref.pt and batch.pt, the TrainBatch) of the shared tiny OAPL case."""
    return make_case(tmp_path_factory.mktemp("oapl_case"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny HF model the end-to-end tests train, built once per session (a fixture imported into several
    modules would be built once per module)."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"), "--out", str(out),
                    "--sft-steps", "30", "data.num_train_prompts=500"], check=True, cwd=ROOT, timeout=600)
    return out
