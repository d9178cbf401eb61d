"""The multi-process harness itself: real horovodrun and mpirun jobs with two ranks."""
import json

import pytest
from support.multiproc import run_snippet

pytestmark = pytest.mark.distributed

COLLECTIVES = """
import json, sys
import horovod.torch as hvd
import torch
hvd.init()
avg = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Average).item()
payload = torch.tensor([42.0 if hvd.rank() == 0 else -1.0])
hvd.broadcast_(payload, root_rank=0)
report = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "avg": avg,
          "bcast": payload.item()}
with open(f"{sys.argv[1]}/rank{hvd.rank()}.json", "w") as f:  # files: launchers may interleave stdout
    json.dump(report, f)
"""


def test_two_ranks_allreduce_and_broadcast(launcher, tmp_path):
    result = run_snippet(COLLECTIVES, tmp_path, np=2, launcher=launcher, timeout=90, args=[str(tmp_path)])
    assert result.returncode == 0, result.output[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["size"] == 2 for r in reports)
    assert all(r["avg"] == pytest.approx(0.5) for r in reports)  # mean of ranks 0 and 1
    assert all(r["bcast"] == 42.0 for r in reports)  # rank 1 started with -1


def test_failing_rank_fails_the_job(launcher, tmp_path):
    code = "import horovod.torch as hvd, sys\nhvd.init()\nsys.exit(3 if hvd.rank() == 1 else 0)\n"
    result = run_snippet(code, tmp_path, np=2, launcher=launcher, timeout=60)
    assert result.returncode != 0
