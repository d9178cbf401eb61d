from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(params=["horovodrun", "mpirun"])
def launcher(request):
    """Run a distributed test under both launchers users have."""
    return request.param


@pytest.fixture(scope="session")
def shakespeare_path():
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return SHAKESPEARE
