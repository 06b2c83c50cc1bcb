import pytest

from tests.support.oapl_case import make_case


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(directory with ref.pt and batch.pt, the TrainBatch) of the shared tiny OAPL case."""
    return make_case(tmp_path_factory.mktemp("oapl_case"))
