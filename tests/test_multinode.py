"""Multi-node for real: two hosts made of network namespaces (tests/support/netns.py), jobs started across them by
mpirun through a launch agent and by horovodrun through ssh, as on a cluster."""
import json
import os
import pwd
import re
import subprocess
import time
from pathlib import Path

import pytest
from support import REPO, netns
from support.files import executable
from support.jobkill import wait_for
from support.multiproc import finish_job
from support.netns import IFACE, launcher_env, start_on_first_host
from support.trainrun import losses, metrics, micro_overrides, train_single

from hvd_llama.weights import checkpoint

NETWORK_TIMEOUT_S = 10  # the launch scripts' -t when the link is cut: how long a silent peer may take


def plain_command(cluster: netns.TwoHosts, launcher: str, program: list) -> list:
    """The launcher itself, with the flags Horovod's docs give for two hosts."""
    if launcher == "horovodrun":
        return ["horovodrun", "--gloo", "-np", "2", "-H", cluster.host_list(), "--network-interfaces", IFACE,
                *program]
    return ["mpirun", "-np", "2", "-H", cluster.host_list(), "-bind-to", "none", "-mca", "plm_rsh_agent",
            str(cluster.write_agent()), "-mca", "btl_tcp_if_include", IFACE, "-mca", "oob_tcp_if_include", IFACE,
            "-x", "PATH", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", *program]


def script_command(cluster: netns.TwoHosts, launcher: str, run_dir: Path, train_overrides: list,
                   *options: str) -> list:
    """The launch/ multi-node script for `launcher`, training into `run_dir`."""
    args = ["--run-dir", str(run_dir), *train_overrides]
    common = ["-H", cluster.host_list(), "-i", IFACE, *options]
    if launcher == "horovodrun":
        return [str(REPO / "launch" / "train_horovodrun_hosts.sh"), *common, "--", *args]
    return [str(REPO / "launch" / "train_mpirun.sh"), *common, "-a", str(cluster.write_agent()), "--", *args]


def host_overrides(data_dir, **extra) -> list:
    # One thread per rank: each "host" thinks it has the machine's cores to itself.
    return micro_overrides(data_dir, **{"dist.threads_per_rank": 1, **extra})


COLLECTIVES = """
import fcntl, json, socket, struct, sys
import horovod.torch as hvd
import torch

def counter(name):
    with open(f"/sys/class/net/{sys.argv[2]}/statistics/{name}") as f:
        return int(f.read())

def address():  # this host's IPv4 address on the interface (SIOCGIFADDR)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", sys.argv[2].encode()))[20:24])

hvd.init()
hvd.allreduce(torch.zeros(1), name="warmup")  # connections are made before counting
tx, rx = counter("tx_bytes"), counter("rx_bytes")
total = hvd.allreduce(torch.full((1 << 20,), float(hvd.rank() + 1)), op=hvd.Sum, name="payload")  # 4 MiB
report = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
          "cross_rank": hvd.cross_rank(), "cross_size": hvd.cross_size(), "address": address(),
          "sum_right": bool((total == 3).all()), "tx": counter("tx_bytes") - tx, "rx": counter("rx_bytes") - rx}
with open(f"{sys.argv[1]}/rank{hvd.rank()}.json", "w") as f:
    json.dump(report, f)
"""


def user_ssh_state() -> list:
    """What the user's own ~/.ssh holds (ssh finds it through the password database, not $HOME)."""
    folder = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else ["absent"]


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_per_host_and_allreduce_crosses_the_link(hosts, launcher, tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    ssh_before = user_ssh_state()
    env = launcher_env(hosts, launcher, tmp_path / "home")
    job = finish_job(start_on_first_host(hosts, plain_command(hosts, launcher, ["python", str(script),
                                                                                str(tmp_path), IFACE]), env),
                     timeout=90)
    assert job.returncode == 0, job.output[-3000:]
    assert user_ssh_state() == ssh_before
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["address"] == hosts.hosts[rank].address  # rank r runs on host r
        assert (report["rank"], report["size"]) == (rank, 2)
        assert (report["local_rank"], report["local_size"]) == (0, 1)  # alone on its host
        assert (report["cross_rank"], report["cross_size"]) == (rank, 2)
        assert report["sum_right"]
        # A 2-rank allreduce of 4 MiB sends and receives about 4 MiB per rank, all through the veth pair.
        assert report["tx"] > 2 << 20 and report["rx"] > 2 << 20, report


@pytest.fixture(scope="module")
def one_process_losses(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    single = train_single(run_dir, host_overrides(data_dir, **{"train.batch_size": 8}))
    assert single.returncode == 0, single.stderr[-3000:]
    return losses(run_dir)


@pytest.mark.distributed
@pytest.mark.slow
def test_training_across_hosts_equals_one_process_with_double_batch(hosts, launcher, data_dir, tmp_path,
                                                                     one_process_losses):
    run_dir = tmp_path / "run"
    env = launcher_env(hosts, launcher, tmp_path / "home")
    before = [host.counter("tx_bytes") for host in hosts.hosts]
    command = script_command(hosts, launcher, run_dir, host_overrides(data_dir))
    job = finish_job(start_on_first_host(hosts, command, env), timeout=120)
    assert job.returncode == 0, job.output[-3000:]
    assert job.output.startswith(f"+ {launcher} ")  # the script shows the command it runs
    assert "replicas identical" in job.output
    assert losses(run_dir) == pytest.approx(one_process_losses, rel=1e-5)
    assert metrics(run_dir)[-1]["tokens"] == 5 * 2 * 4 * 32
    params = int(re.search(r"training ([\d,]+) parameters on 2 rank", job.output).group(1).replace(",", ""))
    sent = [host.counter("tx_bytes") - b for host, b in zip(hosts.hosts, before)]
    # 5 gradient allreduces of `params` float32 values: each host sends about 5 * 4 * params bytes.
    assert all(s > 5 * 4 * params // 2 for s in sent), (sent, params)


LINK_LOST = {"horovodrun": "Timed out waiting", "mpirun": "ORTE has lost communication with a remote daemon"}


@pytest.mark.distributed
@pytest.mark.slow
def test_cutting_the_link_fails_the_job_in_time_and_keeps_the_checkpoint(hosts, launcher, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = launcher_env(hosts, launcher, tmp_path / "home")
    train_overrides = host_overrides(data_dir, **{"train.max_steps": 100000, "checkpoint.every": 10,
                                                  "checkpoint.keep": 2})
    command = script_command(hosts, launcher, run_dir, train_overrides, "-t", str(NETWORK_TIMEOUT_S))
    proc = start_on_first_host(hosts, command, env)
    wait_for(lambda: proc.poll() is not None or checkpoint.list_checkpoints(run_dir), "a checkpoint", timeout=90)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    hosts.hosts[1].set_link(up=False)
    cut = time.monotonic()
    job = finish_job(proc, timeout=NETWORK_TIMEOUT_S + 50)  # fails the test if we have to kill the job
    took = time.monotonic() - cut
    assert job.returncode != 0
    assert took < NETWORK_TIMEOUT_S + 30, f"the job took {took:.0f} s to notice"
    assert LINK_LOST[launcher] in job.output, job.output[-3000:]
    wait_for(lambda: not [c for c in hosts.hosts[1].command_lines() if "hvd_llama.train" in c],
             "the end of rank 1 on the cut-off host", timeout=NETWORK_TIMEOUT_S + 20)
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    checkpoint.verify_checkpoint(newest)  # raises if the cut left it half-written
    assert checkpoint.find_latest_checkpoint(run_dir) == newest


def test_hosts_vanish_afterwards_also_after_a_failure(tmp_path):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="the test failed"):
        with netns.TwoHosts(tmp_path / "one") as one, netns.TwoHosts(tmp_path / "two") as two:
            namespaces = [host.namespace for host in one.hosts + two.hosts]
            assert len(set(namespaces)) == 4  # parallel runs do not share names
            left_behind = subprocess.Popen(one.hosts[1].command(["sleep", "600"]))
            wait_for(lambda: "sleep 600" in one.hosts[1].command_lines(), "sleep's start", timeout=15)
            raise RuntimeError("the test failed")
    assert left_behind.wait(timeout=10) < 0  # killed
    listed = netns.ip("netns", "list").stdout
    assert not [name for name in namespaces if name in listed]
    assert not [name for name in namespaces if (netns.ETC_NETNS / name).exists()]


def fake_slurm(tmp_path) -> dict:
    """An allocation of gpu01 and gpu02 with 8 tasks each, with an `scontrol` that expands its node list."""
    scontrol = executable(tmp_path / "bin" / "scontrol",
                          '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-02]" ] && printf "gpu01\\ngpu02\\n"\n')
    bin_dir = scontrol.parent
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_TASKS_PER_NODE": "8(x2)"}


@pytest.mark.parametrize("script, expected", [
    ("train_mpirun.sh", "mpirun -np 16 -H gpu01:8,gpu02:8 -bind-to none -map-by slot"),
    ("train_horovodrun_hosts.sh", "horovodrun --gloo -np 16 -H gpu01:8,gpu02:8 --gloo-timeout-seconds 60 "
                                  "--network-interfaces ib0"),
])
def test_scripts_take_slurm_nodes_and_print_the_command(script, expected, tmp_path):
    env = {**os.environ, **fake_slurm(tmp_path), "DRY_RUN": "1", "HOROVOD_FUSION_THRESHOLD": "0"}
    out = subprocess.run([str(REPO / "launch" / script), "-i", "ib0", "--", "--config", "my config.yaml"],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.startswith(f"+ {expected}")
    assert out.rstrip().endswith("python -m hvd_llama.train --config 'my config.yaml'")
    if script == "train_mpirun.sh":  # ssh carries no environment: Horovod's knobs are passed by name
        for flags in ("-x HOROVOD_FUSION_THRESHOLD", "-x NCCL_SOCKET_IFNAME", "-mca btl_tcp_if_include ib0",
                      "-mca oob_tcp_if_include ib0", "-mca oob_tcp_keepalive_time 30"):
            assert flags in out


@pytest.mark.parametrize("args, slurm, named", [
    ((), {"SLURM_TASKS_PER_NODE": "8x"}, "SLURM_TASKS_PER_NODE=8x"),
    ((), {"SLURM_NTASKS_PER_NODE": "0"}, "SLURM_NTASKS_PER_NODE=0"),
    (("-s", "2/e;#"), {}, "-s 2/e;#"),  # sed would run each host line as a command (its s///e flag)
    (("-s", "2,gpu03:8"), {}, "-s 2,gpu03:8"),  # a host the allocation does not have
])
def test_slurm_ranks_per_node_must_be_a_number(tmp_path, args, slurm, named):
    env = {**os.environ, **fake_slurm(tmp_path), **slurm, "DRY_RUN": "1"}
    done = subprocess.run([str(REPO / "launch" / "train_mpirun.sh"), *args, "--", "--config", "c.yaml"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {named}: expected a whole number of ranks per node > 0, such as -s 8\n"


def test_scripts_read_a_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=4\nnode2 slots=2\n")
    out = subprocess.run([str(REPO / "launch" / "train_horovodrun_hosts.sh"), "-f", str(hostfile), "-p", "2222",
                          "--", "--resume", "auto"], env={**os.environ, "DRY_RUN": "1"}, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.startswith(f"+ horovodrun --gloo -np 6 -hostfile {hostfile} ")
    assert "--ssh-port 2222" in out
    missing = subprocess.run([str(REPO / "launch" / "train_mpirun.sh"), "--", "--resume", "auto"],
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "error: no hosts" in missing.stderr
