"""hvd_llama/parallel/__init__.py, the Horovod boundary: the device each rank pins (on real ranks, torch.cuda stubbed),
the placement and NCCL checks, the world-size check against the launcher's variables, the CPU defaults."""
import socket

import pytest
from support.multiproc import run_snippet
from support.trainrun import micro_overrides, train_single

from hvd_llama.cli import UserError
from hvd_llama.device import shared_gpu
from hvd_llama.parallel import CPU_HOROVOD_ENV, check_world_size, cpu_defaults, gpu_error

# parallel.init on real ranks with torch.cuda stubbed: which device each rank pins, or the error. argv: how many GPUs
# each rank sees; which physical GPU is behind a visible index (all: every rank sees the node's GPUs; own: each
# rank sees only its own; same: every rank sees the same one); whether Horovod has NCCL (nccl) or not.
BIND = """import sys, torch
from types import SimpleNamespace
import horovod.torch as hvd
from hvd_llama import parallel
from hvd_llama.cli import UserError
from hvd_llama.config import DistConfig
count, binding, nccl = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "nccl"
elastic = sys.argv[4:] == ["elastic"]
pinned = []
torch.cuda.device_count = lambda: count
torch.cuda.set_device = pinned.append
physical = {"all": lambda index: f"GPU-{index}", "own": lambda index: f"GPU-{hvd.local_rank()}",
            "same": lambda index: "GPU-0"}[binding]
torch.cuda.get_device_properties = lambda index: SimpleNamespace(uuid=physical(index))  # a _CUuuid in torch
hvd.nccl_built = lambda: 22703 if nccl else 0
try:
    device = parallel.init(DistConfig(elastic=elastic), "cuda")
    print(f"rank {parallel.rank()} device {device} pinned {pinned} threads {torch.get_num_threads()}")
except UserError as err:
    print(f"rank error: {err}")
"""


@pytest.mark.parametrize("count, binding, expected", [
    pytest.param(1, "own", ["cuda:0", "cuda:0"], marks=pytest.mark.slow), (2, "all", ["cuda:0", "cuda:1"])])
def test_dist_init_pins_the_mapped_device(tmp_path, count, binding, expected):
    job = run_snippet(BIND, tmp_path, [str(count), binding, "nccl"], np=2)
    assert job.returncode == 0, job.output[-3000:]
    lines = {rank: next(line for line in job.lines(rank) if line.startswith("rank")) for rank in (0, 1)}
    for rank in (0, 1):
        index = expected[rank].split(":")[1]
        assert f"device {expected[rank]} pinned [{index}]" in lines[rank], lines
        assert "threads" in lines[rank]


def test_dist_init_refuses_more_ranks_than_devices(tmp_path):
    job = run_snippet(BIND, tmp_path, ["2", "all", "nccl"], np=3, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    for rank in (0, 1, 2):
        assert any("rank error: 3 ranks on this node but this process sees 2 CUDA device(s) "
                   "(CUDA_VISIBLE_DEVICES=0,1)" in line
                   for line in job.lines(rank)), job.output[-3000:]


def rank_errors(job, np: int) -> set:
    """The error line each rank printed (one set element when they agree)."""
    assert job.returncode == 0, job.output[-3000:]
    return {next((line for line in job.lines(rank) if line.startswith("rank ")), "no line") for rank in range(np)}


def test_ranks_on_one_node_sharing_a_gpu_stop_in_one_line(tmp_path):
    """Each rank sees one GPU, the same one (CUDA_VISIBLE_DEVICES=0 given to every rank): device 0 for both."""
    errors = rank_errors(run_snippet(BIND, tmp_path, ["1", "same", "nccl"], np=2), 2)
    assert errors == {f"rank error: ranks 0 and 1 on {socket.gethostname()} both use GPU GPU-0: each rank sees one "
                      "GPU but not its own; give each rank its own GPU (srun --gpus-per-task=1, a per-rank "
                      "CUDA_VISIBLE_DEVICES), or let every rank see all of the node's GPUs"}


def test_elastic_jobs_start_without_the_gpu_check(tmp_path):
    """A worker Horovod Elastic adds to a running job starts in init while the others wait in their state's sync:
    the check's collective would never be answered."""
    errors = rank_errors(run_snippet(BIND, tmp_path, ["1", "same", "none", "elastic"], np=2), 2)
    assert {line.split(" threads")[0] for line in errors} == {"rank 0 device cuda:0 pinned [0]",
                                                              "rank 1 device cuda:0 pinned [0]"}


# one rank exchanges nothing with another GPU
@pytest.mark.parametrize("np, refused", [(2, True), pytest.param(1, False, marks=pytest.mark.slow)])
def test_gpus_with_a_horovod_without_nccl_stop_in_one_line(tmp_path, np, refused):
    [error] = rank_errors(run_snippet(BIND, tmp_path, [str(np), "all", "none"], np=np), np)
    assert error.startswith(f"rank error: Horovod on {socket.gethostname()} was built without NCCL") == refused
    assert error.endswith("rebuild it with launch/install.sh --cuda (it needs the CUDA toolkit: CUDA_HOME or nvcc "
                          "on PATH)") == refused


def test_gpu_error_decides_on_every_ranks_placement():
    assert shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-1")]) is None  # two nodes: two GPUs
    assert shared_gpu([("a", None), ("a", None)]) is None  # torch < 2.4 cannot tell: not compared
    shared = shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-3"), ("a", "GPU-1"), ("a", "GPU-2")])
    assert shared.startswith("ranks 0 and 3 on a both use GPU GPU-1: ") and "\n" not in shared
    assert gpu_error([("a", "GPU-1", False)]) is None
    assert gpu_error([("a", "GPU-1", True), ("b", "GPU-1", True)]) is None
    missing = gpu_error([("b", "GPU-1", False), ("a", "GPU-1", True), ("c", "GPU-1", False), ("b", "GPU-2", False)])
    assert missing.startswith("Horovod on b, c was built without NCCL (hvd.nccl_built() is 0)")
    assert gpu_error([("a", "GPU-1", False), ("a", "GPU-1", False)]).startswith("ranks 0 and 1 on a")


def test_world_size_check_reads_the_launchers_variables():
    check_world_size(4, {"OMPI_COMM_WORLD_SIZE": "4"})
    check_world_size(1, {})
    check_world_size(1, {"SLURM_NTASKS": "16"})  # the batch script itself: one process may run alone
    check_world_size(1, {"HOROVOD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})  # horovodrun builds its own world
    check_world_size(8, {"OMPI_COMM_WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "1"})  # mpirun inside srun -n1
    for env in ({"OMPI_COMM_WORLD_SIZE": "4"}, {"PMI_SIZE": "16"}, {"SLURM_STEP_NUM_TASKS": "2"}):
        with pytest.raises(UserError, match=f"{next(iter(env))}="):
            check_world_size(1, env)


def test_training_as_a_lone_rank_of_a_bigger_world_stops_in_one_line(data_dir, tmp_path):
    """What each of 4 tasks would see if MPI had not connected them: a world of 1 under a launcher of 4."""
    run = train_single(tmp_path / "run", micro_overrides(data_dir), env={"OMPI_COMM_WORLD_SIZE": "4"}, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the launcher started 4 processes (OMPI_COMM_WORLD_SIZE=4)") and "world has 1" in last
    assert not (tmp_path / "run").exists()


def test_cpu_defaults_fill_only_what_the_launcher_or_user_left_unset():
    env = {"HOROVOD_CYCLE_TIME": "2"}  # horovodrun --cycle-time-ms 2
    applied = cpu_defaults(env)
    assert env["HOROVOD_CYCLE_TIME"] == "2" and "HOROVOD_CYCLE_TIME" not in applied
    assert applied == {"OMPI_MCA_mpi_yield_when_idle": "1"} == {k: env[k] for k in applied}
    fresh = {}
    assert cpu_defaults(fresh) == CPU_HOROVOD_ENV == fresh
