"""The launch scripts' commands, read from their DRY_RUN output with stand-ins for nvidia-smi, torch, srun."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO
from support.files import executable

NVIDIA_SMI_8 = "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)\"; done\n"


def run_script(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / script), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=True)


def single_node_env(tmp_path, torch_gpus: int | None) -> dict:
    """nvidia-smi lists 8 GPUs (as on an 8-GPU node split by CUDA_VISIBLE_DEVICES or MIG); torch, if stubbed,
    sees `torch_gpus`; None keeps the real (CPU) torch."""
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "nvidia-smi", NVIDIA_SMI_8)
    env = dict(os.environ, DRY_RUN="1", PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                                               os.environ["PATH"]]))
    if torch_gpus is not None:
        torch = tmp_path / "stub" / "torch"
        torch.mkdir(parents=True)
        (torch / "__init__.py").write_text(f"class cuda:\n    device_count = staticmethod(lambda: {torch_gpus})\n")
        env["PYTHONPATH"] = str(torch.parent)
    return env


@pytest.mark.parametrize("torch_gpus, np", [(3, 3), (None, 2)])  # None: this CPU machine's torch, 0 GPUs
def test_single_node_starts_one_rank_per_gpu_torch_sees_not_per_nvidia_smi_line(tmp_path, torch_gpus, np):
    out = run_script("train_single_node.sh", "--", "--config", "my config.yaml",
                     env=single_node_env(tmp_path, torch_gpus)).stdout
    assert out == f"+ horovodrun -np {np} -H localhost:{np} python -m hvd_llama.train --config 'my config.yaml'\n"


def test_single_node_np_flag_wins(tmp_path):
    out = run_script("train_single_node.sh", "-n", "5", "--timeline", "t.json", env=single_node_env(tmp_path, 3))
    assert shlex.split(out.stdout)[1:] == ["horovodrun", "-np", "5", "-H", "localhost:5", "--timeline-filename",
                                           "t.json", "python", "-m", "hvd_llama.train"]


@pytest.mark.parametrize("cpus_per_task", ["12", None])
def test_slurm_passes_cpus_per_task_to_srun(tmp_path, cpus_per_task):
    """Slurm >= 22.05: srun does not inherit the job's --cpus-per-task. A stub srun prints what it was given."""
    executable(tmp_path / "bin" / "srun", "#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", SLURM_NTASKS="16", SLURM_JOB_ID="42")
    if cpus_per_task:
        env["SLURM_CPUS_PER_TASK"] = cpus_per_task
    args = run_script("train_slurm.sbatch", "--config", "my config.yaml", env=env).stdout.splitlines()
    expected = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    assert args == ["--mpi=pmix", "--kill-on-bad-exit=1", *expected, "python", "-m", "hvd_llama.train",
                    "--resume", "auto", "--config", "my config.yaml"]


def test_slurm_tells_the_ranks_the_notice_of_its_signal(tmp_path):
    """SLURM exports nothing of --signal: the script reads its own #SBATCH line (USR1@120) for the ranks' start-up
    check (training/preemption.py); a value exported at submission (with sbatch --signal=...@N) wins."""
    executable(tmp_path / "bin" / "srun", "#!/bin/sh\necho \"notice=$HVD_LLAMA_STOP_NOTICE_S\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HVD_LLAMA_"))}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="42")
    assert run_script("train_slurm.sbatch", env=env).stdout == "notice=120\n"
    assert run_script("train_slurm.sbatch", env={**env, "HVD_LLAMA_STOP_NOTICE_S": "300"}).stdout == "notice=300\n"


def test_the_scripts_give_mpirun_open_mpis_own_sigkill_timeout(tmp_path):
    """A supervised mpirun never sees a stop signal, so its sigkill timeout only paces the end of a job whose rank
    died: Open MPI's 1 s, whatever the venv's activate set for plain mpirun (60 s: launch/install.sh)."""
    executable(tmp_path / "bin" / "mpirun", "#!/bin/sh\necho \"sigkill=$OMPI_MCA_odls_base_sigkill_timeout\"\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               OMPI_MCA_odls_base_sigkill_timeout="60")
    out = run_script("train_mpirun.sh", "-H", "node1:2", "--", "--config", "c.yaml", env=env).stdout
    assert out.splitlines()[-1] == "sigkill=1"


FORWARDED = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/repo", "LD_LIBRARY_PATH": "/opt/nccl/lib",
             "LD_PRELOAD": "/opt/aws-ofi-nccl/lib/libnccl-net.so", "OMP_NUM_THREADS": "8",
             "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
             "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "INFO", "UCX_TLS": "rc,sm",
             "FI_PROVIDER": "efa", "HOROVOD_FUSION_THRESHOLD": "0", "HVD_LLAMA_FAULT": "none"}
NOT_FORWARDED = {"HOME": "/root", "LANG": "C.UTF-8", "NCCLX": "1", "MY_NCCL_X": "1", "TORCHELASTIC_RUN_ID": "1",
                 "PATHS": "x", "FIX": "1"}


@pytest.mark.parametrize("env, expected", [
    ({**FORWARDED, **NOT_FORWARDED}, set(FORWARDED)),
    ({"PATH": "/usr/bin:/bin", "HOME": "/root"}, {"PATH", "NCCL_DEBUG"}),  # NCCL_DEBUG: the script's default
])
def test_mpirun_forwards_each_set_variable_once_and_nothing_unset(env, expected):
    out = run_script("train_mpirun.sh", "-H", "node1:2,node2:2", "--", "--config", "c.yaml",
                     env={**env, "PATH": f"{env['PATH']}:{os.environ['PATH']}", "DRY_RUN": "1"}).stdout
    words = shlex.split(out)
    names = [words[i + 1] for i, word in enumerate(words) if word == "-x"]
    assert sorted(names) == sorted(expected)  # each exactly once, none that is unset or unrelated
    assert words[-4:] == ["-m", "hvd_llama.train", "--config", "c.yaml"]


@pytest.mark.parametrize("extra, cooldown", [([], []), (["--cooldown", "60", "300"],
                                                        ["--blacklist-cooldown-range", "60", "300"])])
def test_elastic_passes_the_blacklist_cooldown_to_horovodrun(tmp_path, extra, cooldown):
    out = run_script("train_elastic.sh", "-n", "3", "--min-np", "2", "-i", "lo", "-d", "/x/discover.sh", *extra,
                     "--", "--config", "my config.yaml", env=dict(os.environ, DRY_RUN="1")).stdout
    assert shlex.split(out)[1:] == ["horovodrun", "-np", "3", "--min-np", "2", "--network-interfaces", "lo",
                                    *cooldown, "--host-discovery-script", "/x/discover.sh", "python", "-m",
                                    "hvd_llama.train", "--elastic", "--config", "my config.yaml"]
