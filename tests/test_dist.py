"""hvd_llama.dist under a real launcher: what init sets up for a CPU rank."""
import pytest

from multiproc import run_snippet

pytestmark = pytest.mark.distributed

CYCLE_TIME = """
import os
from hvd_llama import dist
from hvd_llama.config import DistConfig
dist.init(DistConfig(), "cpu")
print("CYCLE_TIME", os.environ["HOROVOD_CYCLE_TIME"])
"""


@pytest.mark.parametrize("launcher_args, expected", [((), "5"), (("--cycle-time-ms", "2"), "2.0")])
def test_cpu_cycle_time_default_and_horovodrun_override(tmp_path, launcher_args, expected):
    result = run_snippet(CYCLE_TIME, tmp_path, np=2, timeout=60, launcher_args=launcher_args)
    assert result.returncode == 0, result.output[-3000:]
    for rank in (0, 1):
        assert [line for line in result.lines(rank) if line.startswith("CYCLE_TIME")] == [f"CYCLE_TIME {expected}"]
