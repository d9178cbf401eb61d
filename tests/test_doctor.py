"""`python -m hvd_llama.doctor` and the MFU peak: real runs with one and two ranks, and the traps constructed."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import horovod
import horovod.torch as hvd
import pytest
import torch
from support import REPO
from support.multiproc import job_env, run_job
from support.trainrun import metrics, micro_overrides, train_single

from hvd_llama import device as device_module
from hvd_llama import doctor
from hvd_llama.device import datasheet_peak, device_peak_flops, format_flops, measure_peak_flops

CORES = len(os.sched_getaffinity(0))
SUMMARY = re.compile(r"^doctor: (\d+) warnings?, (\d+) problems?$")
CONTROLLER_BACKEND = {"horovodrun": "Gloo", "mpirun": "MPI"}  # multiproc runs horovodrun with --gloo


def cpu_has_native_bf16() -> bool:
    """Read independently of doctor: any /proc/cpuinfo flags line naming AVX-512 BF16 or AMX BF16."""
    text = Path("/proc/cpuinfo").read_text()
    return bool(re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", text, re.M))


def run_doctor(tmp_path: Path, *args: str, np: int = 0, launcher: str = "horovodrun", env=None, timeout=180):
    """Doctor as users run it: one plain process (np=0) or a job; returns (job, rank 0's lines, JSON report)."""
    out = tmp_path / f"doctor_{launcher}_{np}.json"
    job = run_job(["-m", "hvd_llama.doctor", "--json", str(out), *args], np=np, launcher=launcher, env=env,
                  timeout=timeout)
    lines = job.lines(0) if np else job.output.splitlines()
    # mpirun --tag-output tags each chunk it reads: a report longer than one of its reads has a tag inside a
    # line, and the tag of an empty trailing chunk may be glued to rank 0's last line.
    lines = [re.sub(r"\[\d+,\d+\]<stdout>:", "", line) for line in lines]
    return job, lines, json.loads(out.read_text()) if out.exists() else None


def check_consistent(lines: list, report: dict) -> None:
    """The printed table is the JSON report, formatted; the summary counts its warnings and problems."""
    assert lines == doctor.format_report(report)
    match = SUMMARY.match(lines[-1])
    assert match and (int(match[1]), int(match[2])) == (len(report["warnings"]), len(report["problems"]))
    assert sum(line.startswith("warning: ") for line in lines) == len(report["warnings"])
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["horovod"] == report["horovod"]["version"] == horovod.__version__
    built = report["horovod"]
    assert (built["mpi_built"], built["gloo_built"], built["cuda_built"]) == \
        (hvd.mpi_built(), hvd.gloo_built(), hvd.cuda_built())
    assert (built["nccl_built"] is None) == (hvd.nccl_built() == 0)
    for p in report["peak"].values():
        assert math.isfinite(p["measured_flops"]) and p["measured_flops"] > 0
        assert p["all_ranks_flops"] >= p["measured_flops"]


# ---- the peak behind MFU -------------------------------------------------------------------------------------
def test_peak_syncs_once_per_timed_batch_of_back_to_back_matmuls(monkeypatch):
    """With a clock where each matmul takes 1 ms: batches double until one lasts a tenth of the budget, each
    ends with the one sync, and the figure is a batch's FLOPs over its time."""
    events, clock = [], [0.0]
    real_matmul = torch.matmul

    def timed_matmul(*args, **kwargs):
        events.append("matmul")
        clock[0] += 1e-3
        return real_matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", timed_matmul)
    monkeypatch.setattr(device_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    n = 64
    flops = measure_peak_flops(torch.device("cpu"), n=n, seconds=0.2, sync=lambda: events.append("sync"))
    batches = [len(chunk) for chunk in "".join("m" if e == "matmul" else "|" for e in events).split("|")]
    assert batches[-1] == 0 and all(batches[:-1]), events[:20]  # every sync ends a batch of matmuls
    # The warm-up; batches of 1..16 ms double (under 20 ms); 32 ms ones fill the budget, 1 + 200 ms, and end past it.
    assert batches[:-1] == [1] + [1, 2, 4, 8, 16] + [32] * 6, batches
    assert flops == pytest.approx(2 * n**3 / 1e-3)


def test_peak_is_at_least_the_per_matmul_sync_measurement():
    """The best of back-to-back batches is not below the old loop's figure (a sync after each matmul)."""
    def naive(n=512, seconds=0.3):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        iterations, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            iterations += 1
        return 2 * n**3 * iterations / (time.perf_counter() - start)

    # Interleaved, so that a change in the shared machine's load hits both alike.
    old, new = zip(*[(naive(), measure_peak_flops(torch.device("cpu"), n=512)) for _ in range(3)])
    # No upper bound: on a shared machine the best batch may catch an idle moment the averaged loop never sees
    # (the fake-clock test above pins the arithmetic).
    assert all(math.isfinite(f) and f > 0 for f in new) and max(new) >= 0.8 * max(old), (old, new)


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, ("H100 SXM", 989e12)),
    ("NVIDIA H100 PCIe", torch.bfloat16, ("H100 PCIe", 756e12)),
    ("NVIDIA H100 NVL", torch.float16, ("H100 NVL", 835e12)),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, ("A100", 312e12)),
    ("NVIDIA A100 80GB PCIe", torch.bfloat16, ("A100", 312e12)),
    ("NVIDIA A10", torch.bfloat16, ("A10", 125e12)),
    ("NVIDIA L40S", torch.bfloat16, ("L40S", 362e12)),
    ("NVIDIA L4", torch.bfloat16, ("L4", 121e12)),
    ("NVIDIA A10G", torch.bfloat16, None),  # not an A10: no guess
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
    ("NVIDIA H100 80GB HBM3", torch.float32, None),  # fp32's peak depends on TF32: measured
])
def test_datasheet_lookup_by_device_name(monkeypatch, name, dtype, expected):
    assert datasheet_peak(name, dtype) == expected
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(device_module, "measure_peak_flops", lambda device, dtype: 1.5e12)
    flops, source = device_peak_flops(torch.device("cuda", 0), dtype)
    assert (flops, source) == ((expected[1], f"datasheet {expected[0]}") if expected else (1.5e12, "measured"))


def test_cpu_peak_is_measured_whatever_the_dtype():
    flops, source = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert source == "measured" and math.isfinite(flops) and flops > 0


def test_train_logs_which_peak_its_mfu_uses(small_data, tmp_path):
    result = train_single(tmp_path / "run", micro_overrides(small_data, **{"train.max_steps": 2,
                                                                           "log.peak_flops": 0}))
    assert result.returncode == 0, result.stderr[-3000:]
    peak_lines = [line for line in result.stdout.splitlines() if line.startswith("MFU peak: ")]
    assert len(peak_lines) == 1 and peak_lines[0].endswith("over 1 rank(s) (measured)"), result.stdout
    assert all(0 < r["mfu"] < 1 for r in metrics(tmp_path / "run") if "mfu" in r)


# ---- doctor's pieces -----------------------------------------------------------------------------------------
def test_cpu_bf16_flags_from_cpuinfo():
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    old = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert doctor.cpu_bf16_flags(x86) == ["amx_bf16", "avx512_bf16"]
    assert doctor.cpu_bf16_flags(arm) == ["bf16"]
    assert doctor.cpu_bf16_flags(old) == [] and doctor.cpu_bf16_flags("") == []


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """One plain process asked for bf16 with OMP_NUM_THREADS=1 (multiproc's default)."""
    return run_doctor(tmp_path_factory.mktemp("doctor"), "--precision", "bf16")


def traps(report: dict) -> list:
    return doctor.diagnose(report)[0]


def test_diagnose_fires_each_warning_when_its_condition_is_constructed(one_rank):
    def changed(**fields):
        return {**json.loads(json.dumps(one_rank[2])), "cpu_bf16_flags": ["avx512_bf16"],
                "mpirun_stop": {"sigkill_timeout_s": 60, "source": "OMPI_MCA_odls_base_sigkill_timeout"}, **fields}

    assert traps(changed()) == []  # one rank, train's default threads, OMP_NUM_THREADS=1, the venv's mpirun grace
    assert traps(changed(mpirun_stop=None)) == []  # no Open MPI
    [mpirun] = traps(changed(mpirun_stop={"sigkill_timeout_s": 1, "source": "default"}))
    assert mpirun.startswith("plain mpirun (and horovodrun's MPI mode) SIGKILLs the ranks 1 s after it forwards a "
                             "SIGTERM or Ctrl-C (odls_base_sigkill_timeout, from default)")
    assert "export OMPI_MCA_odls_base_sigkill_timeout=60" in mpirun

    no_bf16 = traps(changed(cpu_bf16_flags=[], precision="bf16", device="cpu"))
    assert len(no_bf16) == 1 and "without native bf16" in no_bf16[0]
    assert traps(changed(cpu_bf16_flags=[], precision="fp32", device="cpu")) == []
    assert traps(changed(cpu_bf16_flags=[], precision="bf16", device="cuda")) == []

    threads = traps(changed(threads_per_rank={"intra_op": 2, "source": "--threads"}, local_size=CORES))
    assert len(threads) == 1 and f"{CORES} rank(s) on this node x 2 threads = {2 * CORES} > {CORES}" in threads[0]
    assert traps(changed(threads_per_rank={"intra_op": 1, "source": "x"}, local_size=CORES)) == []
    omp = traps(changed(omp_num_threads=str(CORES + 1)))
    assert len(omp) == 1 and omp[0].startswith(f"OMP_NUM_THREADS={CORES + 1} x 1 rank(s)")

    gpu = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30, "capability": "9.0"}]
    nccl = {op: "NCCL" for op in ("allreduce", "allgather", "broadcast", "reducescatter")}
    built = one_rank[2]["horovod"]
    horovod_nccl = {**built, "backends": {"cpu": built["backends"]["cpu"], "cuda": nccl}}
    assert traps(changed(gpus=gpu, horovod=horovod_nccl)) == []
    host_copy = {**horovod_nccl, "backends": {"cuda": {**nccl, "reducescatter": "MPI", "allgather": "MPI"}}}
    [warning] = traps(changed(gpus=gpu, horovod=host_copy))
    assert "allgather, reducescatter of GPU tensors without NCCL" in warning and "sharded optimizer" in warning

    for flag, name in (("gloo_built", "Gloo"), ("mpi_built", "MPI")):
        [warning] = traps(changed(horovod={**built, flag: False}))
        assert warning.startswith(f"Horovod was built without {name}")
    [warning] = traps(changed(horovod={**built, "exit_status_patch": False}))
    assert "horovodrun --gloo can end with exit status 0 for a job it stopped" in warning

    hosts = one_rank[2]["hosts"]
    other = {**hosts, "node2": {**next(iter(hosts.values())), "horovod": "0.27.0", "ranks": [1]}}
    [warning] = traps(changed(hosts=other))
    assert warning.startswith("node2 runs") and "Horovod 0.27.0" in warning


def test_what_would_stop_training_on_the_gpus_is_a_problem_not_a_stop(monkeypatch):
    """collect_horovod on a GPU with Horovod faked: the doctor reports parallel.gpu_error's findings, and its init
    does not stop on them."""
    from hvd_llama.config import DistConfig
    from hvd_llama.parallel import gpu_error
    from hvd_llama.parallel import report as parallel_report
    checked = []
    monkeypatch.setattr(parallel_report.parallel, "init", lambda cfg, device, check_gpus=True: checked.append(check_gpus))
    monkeypatch.setenv("HOROVOD_TIMELINE", "")  # report.init sets it: put back afterwards
    parallel_report.init(DistConfig(), "cuda")
    assert checked == [False]
    placements = [("node1", "GPU-0", True), ("node1", "GPU-0", True)]
    fake = SimpleNamespace(
        parallel=SimpleNamespace(allgather_object=lambda mine, name: [mine, {**mine, "rank": 1}], gpu_error=gpu_error,
                             gpu_placements=lambda index: placements),
        report=SimpleNamespace(controllers=lambda: {}, collective_backends=lambda devices: {},
                               allreduces_bfloat16=lambda: None))

    def problems():
        report = {"host": "node1", "rank": 0, "size": 2, "cores": {"usable": 2}, "gpus": [], "problems": [],
                  "horovod": {"version": "0.28.1"}}
        doctor.collect_horovod(report, fake, torch.device("cuda", 0), SimpleNamespace(skip_bandwidth=True))
        return report["problems"]

    [shared] = problems()
    assert shared.startswith("ranks 0 and 1 on node1 both use GPU GPU-0: ")
    placements[1] = ("node1", "GPU-1", False)
    [no_nccl] = problems()
    assert no_nccl.startswith("Horovod on node1 was built without NCCL")
    placements[1] = ("node1", "GPU-1", True)
    assert problems() == []


def test_one_process_reports_consistent_figures(one_rank):
    job, lines, report = one_rank
    assert job.returncode == 0, job.output[-3000:]
    check_consistent(lines, report)
    assert (report["size"], report["local_size"], report["rank"]) == (1, 1, 0)
    controllers = report["horovod"]["controllers"]
    in_use = [name for name, c in controllers.items() if c["enabled"]]
    assert len(in_use) == 1  # a plain process: Horovod starts its MPI controller when it has one
    assert report["horovod"]["backends"] == {"cpu": {op: {"mpi": "MPI", "gloo": "Gloo"}[in_use[0]]
                                                     for op in ("allreduce", "allgather", "broadcast",
                                                                "reducescatter")}}
    assert report["bandwidth"] is None and report["bandwidth_note"].startswith("not applicable: 1 rank")
    # multiproc's job environment gives mpirun Open MPI's own 1 s: doctor reports it, and where it comes from
    assert report["mpirun_stop"] == {"sigkill_timeout_s": 1, "source": "OMPI_MCA_odls_base_sigkill_timeout"}
    assert doctor.row("mpirun stop", "SIGKILL 1 s after SIGTERM/Ctrl-C (odls_base_sigkill_timeout, from "
                                     "OMPI_MCA_odls_base_sigkill_timeout)") in lines
    assert any(w.startswith("plain mpirun (and horovodrun's MPI mode) SIGKILLs the ranks 1 s")
               for w in report["warnings"])
    assert report["threads_per_rank"]["intra_op"] == max(1, os.cpu_count() // 1)  # train's default
    assert report["torch_threads_at_start"]["intra_op"] == 1  # OMP_NUM_THREADS=1
    # bf16 was asked for on this CPU: the warning fires exactly when the CPU lacks native bf16.
    assert any("without native bf16" in w for w in report["warnings"]) == (not cpu_has_native_bf16())
    assert list(report["peak"]) == ["fp32", "bf16"]  # fp32 and the precision asked for, both measured on a CPU
    assert all(p["mfu_uses"] == "measured" and p["datasheet"] is None for p in report["peak"].values())
    assert (report["horovod"]["bfloat16_error"] is None) == (not any(n.startswith("Horovod cannot allreduce "
                                                                                 "bfloat16") for n in report["notes"]))


def test_horovodrun_one_rank_warns_of_threads_over_cores(tmp_path):
    job, lines, report = run_doctor(tmp_path, "--threads", str(CORES + 1), np=1)
    assert job.returncode == 0, job.output[-3000:]
    check_consistent(lines, report)
    assert report["size"] == 1 and report["bandwidth"] is None
    assert report["threads_per_rank"] == {"intra_op": CORES + 1, "source": "--threads"}
    [warning] = [w for w in report["warnings"] if "threads =" in w]
    assert f"1 rank(s) on this node x {CORES + 1} threads = {CORES + 1} > {CORES} usable cores" in warning


def test_two_ranks_measure_bandwidth_and_only_rank_0_prints(tmp_path, launcher):
    sizes = (0.25, 1.5)  # MiB; uneven, so a wrong byte count shows
    job, lines, report = run_doctor(tmp_path, "--sizes-mib", ",".join(map(str, sizes)), "--iterations", "3",
                                    np=2, launcher=launcher, env={"OMP_NUM_THREADS": str(CORES)})
    assert job.returncode == 0, job.output[-3000:]
    assert set(job.ranks) == {0}, "only rank 0 prints"
    check_consistent(lines, report)
    assert (report["size"], report["local_size"]) == (2, 2)
    assert list(report["hosts"].values())[0]["ranks"] == [0, 1]
    backend = CONTROLLER_BACKEND[launcher]
    assert set(report["horovod"]["backends"]["cpu"].values()) == {backend}
    assert report["horovod"]["controllers"][backend.lower()]["enabled"]
    rows = report["bandwidth"]
    assert [r["bytes"] for r in rows] == [int(s * (1 << 20)) for s in sizes]
    for r in rows:
        assert r["seconds"] > 0 and r["busbw_bytes_per_s"] > 0
        assert math.isclose(r["busbw_bytes_per_s"], 2 * (2 - 1) / 2 * r["bytes"] / r["seconds"])
    # OMP_NUM_THREADS=cores on each of 2 ranks oversubscribes; train's own default (cores / 2) does not.
    assert [w for w in report["warnings"] if "threads" in w.lower()] == \
        [w for w in report["warnings"] if w.startswith(f"OMP_NUM_THREADS={CORES} x 2 rank(s)")] != []
    assert report["peak"]["fp32"]["all_ranks_flops"] > report["peak"]["fp32"]["measured_flops"]


def test_unimportable_horovod_is_one_problem_and_exit_1(tmp_path):
    code = "import sys; sys.modules['horovod'] = None\nfrom hvd_llama.doctor import main\nmain(sys.argv[1:])"
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-c", code, "--json", str(out)], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 1 and "horovod" in problems[0].lower() and "launch/install.sh" in problems[0]
    report = json.loads(out.read_text())
    assert report["problems"] == [problems[0][len("problem: "):]] and SUMMARY.match(lines[-1])[2] == "1"
    assert report["peak"]["fp32"]["measured_flops"] > 0 and "bandwidth" not in report  # the rest still reported


def test_unimportable_torch_is_one_problem_and_exit_1():
    code = "import sys; sys.modules['torch'] = None\nfrom hvd_llama.doctor import main\nmain([])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=job_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].startswith("problem: torch cannot be imported")
    assert result.stdout.splitlines()[-1] == "doctor: 0 warnings, 1 problem"


def test_bad_sizes_are_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(["--sizes-mib", "1,big"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sizes-mib '1,big'")


def test_printed_flops_match_json(one_rank):
    _, lines, report = one_rank
    fp32 = [line for line in lines if line.strip().startswith("fp32 ")]
    assert len(fp32) == 1 and format_flops(report["peak"]["fp32"]["measured_flops"]) in fp32[0]
