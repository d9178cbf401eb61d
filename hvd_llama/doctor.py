"""Check a node before a long job: `python -m hvd_llama.doctor`, or `horovodrun -np N python -m hvd_llama.doctor`.

What DeepSpeed's `ds_report` and `horovodrun --check-build` say, in one place: versions; Horovod's controllers
and the backend that serves each collective on CPU and GPU tensors; cores, threads and GPUs; the measured matmul
peak; under a launcher, the allreduce bandwidth between the ranks. Warnings name known traps. Rank 0 prints, every
rank takes part. Exit status 1 when something required is missing (torch, Horovod with PyTorch, a controller) or
training would refuse the GPUs (two ranks of a node on one GPU, several ranks with a Horovod built without NCCL).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from typing import Optional, Sequence

from hvd_llama.cli import UserError, run_main
from hvd_llama.files import atomic_write_text
from hvd_llama.training.preemption import MIN_GRACE_S, SIGKILL_VARIABLE, open_mpi_sigkill_timeout

try:
    import torch

    from hvd_llama.config import DistConfig, load_config
    from hvd_llama.device import datasheet_peak, format_flops, gpu_uuid, matmul_size, measure_peak_flops
except ImportError as err:  # no torch: doctor says so in one line rather than a traceback
    TORCH_MISSING: Optional[ImportError] = err
else:
    TORCH_MISSING = None

MIB = 1 << 20
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX) and Arm (FEAT_BF16) names
WIDTH = 22  # label column


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hvd_llama.doctor", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", metavar="OUT", help="also write the report as a JSON object to OUT")
    p.add_argument("--config", help="a training config: its train.precision, train.device and "
                                    "dist.threads_per_rank are checked")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="precision to check (overrides --config)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank to check (overrides --config; "
                                                          "0 = train's default, cores / ranks on this node)")
    p.add_argument("--skip-bandwidth", action="store_true", help="do not measure the allreduce bandwidth")
    p.add_argument("--sizes-mib", default="1,4,16,64", help="allreduce message sizes for the bandwidth, in MiB")
    p.add_argument("--iterations", type=int, default=10, help="timed allreduces per size (the median is reported)")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(float(s) * MIB) for s in args.sizes_mib.split(",")]
    except ValueError:
        raise UserError(f"--sizes-mib {args.sizes_mib!r}: expected comma-separated numbers, e.g. 1,4,16,64") from None
    if not args.sizes or min(args.sizes) < 4 or args.iterations < 1 or args.threads < 0:
        raise UserError(f"--sizes-mib {args.sizes_mib!r}, --iterations {args.iterations}, --threads {args.threads}: "
                        "expected sizes > 0, iterations >= 1 and threads >= 0")
    return args


# ---- facts ---------------------------------------------------------------------------------------------------
def package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mpi_version() -> Optional[str]:
    """The MPI that `mpirun` on PATH belongs to, e.g. "Open MPI 4.1.4"."""
    if not shutil.which("mpirun"):
        return None
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(Open MPI\) (\S+)", out)
    return f"Open MPI {match.group(1)}" if match else (out.strip().splitlines() or [None])[0]


def versions() -> dict:
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl_torch": nccl_torch() if cuda else None,
            "horovod": package_version("horovod"), "mpi": mpi_version(),
            "sentencepiece": package_version("sentencepiece")}


def nccl_torch() -> str:
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int code in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cpu_bf16_flags(cpuinfo: str) -> list:
    """The native-bf16 CPU features /proc/cpuinfo lists ("flags" on x86, "Features" on Arm)."""
    found = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(f for f in value.split() if f in CPU_BF16_FLAGS)
    return sorted(found)


def read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def gpus() -> list:
    if not torch.cuda.is_available():
        return []
    return [{"index": i, "name": torch.cuda.get_device_name(i),
             "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
             "uuid": gpu_uuid(i)}
            for i in range(torch.cuda.device_count())]


def requested(args: argparse.Namespace):
    """(precision, device kind, threads per rank or 0) to check, from the flags and the --config."""
    cfg = load_config(args.config) if args.config else None
    precision = args.precision or (cfg.train.precision if cfg else "fp32")
    device = cfg.train.device if cfg else "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or (cfg.dist.threads_per_rank if cfg else 0)
    return precision, device, threads


def measure_peaks(device, precision: str, gpu_name: Optional[str], horovod) -> dict:
    """Matmul peaks of this rank with every rank measuring at once (as train measures MFU's denominator):
    fp32, bf16 on a GPU, and the precision asked for."""
    wanted = ["fp32"] + (["bf16"] if device.type == "cuda" else []) + [precision]
    dtypes = {label: {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[label] for label in wanted}
    peaks = {}
    for label, dtype in dtypes.items():
        if horovod:
            horovod.parallel.allreduce_sum(torch.zeros(1), name=f"doctor.peak.{label}.barrier")
        own = measure_peak_flops(device, dtype)
        total = own
        if horovod:
            total = horovod.parallel.allreduce_sum(torch.tensor([own], dtype=torch.float64), name=f"doctor.peak.{label}")
            total = total.item()
        known = datasheet_peak(gpu_name, dtype) if gpu_name else None
        peaks[label] = {"measured_flops": own, "all_ranks_flops": total, "matmul_n": matmul_size(device, dtype),
                        "datasheet": {"gpu": known[0], "flops": known[1]} if known else None,
                        "mfu_uses": f"datasheet {known[0]}" if known else "measured"}
    return peaks


class Horovod:
    """hvd_llama.parallel and its report module, or why they cannot be imported."""

    def __init__(self):
        try:
            from hvd_llama import parallel
            from hvd_llama.parallel import report
        except ImportError as err:
            self.parallel = self.report = None
            installed = package_version("horovod")
            self.error = (f"Horovod {installed} is installed but horovod.torch cannot be imported ({err}): built "
                          "without PyTorch or for another torch; rerun launch/install.sh" if installed else
                          f"Horovod cannot be imported ({err}); run launch/install.sh")
        else:
            self.parallel, self.report, self.error = parallel, report, None


# ---- the report ----------------------------------------------------------------------------------------------
def collect(args: argparse.Namespace) -> dict:
    precision, device_kind, threads = requested(args)
    horovod = Horovod()
    report = {"host": socket.gethostname(), "precision": precision, "device": device_kind,
              "cores": {"usable": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count()},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "torch_threads_at_start": {"intra_op": torch.get_num_threads(),
                                         "inter_op": torch.get_num_interop_threads()},
              "cpu_bf16_flags": cpu_bf16_flags(read_cpuinfo()), "gpus": gpus(),
              "horovod": {"error": horovod.error}, "problems": [] if horovod.parallel else [horovod.error]}
    if horovod.parallel:
        report["horovod"].update(horovod.report.build())
        if not (report["horovod"]["mpi_built"] or report["horovod"]["gloo_built"]):
            report["problems"].append("Horovod was built with neither MPI nor Gloo: no controller can start it; "
                                      "rerun launch/install.sh")
            horovod.parallel = None
    if horovod.parallel:
        device = horovod.report.init(DistConfig(threads_per_rank=threads), device_kind)
        rank, size, local_size = horovod.parallel.rank(), horovod.parallel.size(), horovod.report.local_size()
    else:
        rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))  # print once
        device, size = torch.device(device_kind), 1
        local_size = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("HOROVOD_LOCAL_SIZE", 1)))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_size))  # as parallel.init does
    source = ("--threads" if args.threads else "config dist.threads_per_rank" if threads else
              "train's default: cores / ranks on this node")
    report.update(rank=rank, size=size, local_size=local_size,
                  threads_per_rank={"intra_op": torch.get_num_threads(), "source": source})
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report["peak"] = measure_peaks(device, precision, gpu_name, horovod if horovod.parallel else None)
    if horovod.parallel:
        collect_horovod(report, horovod, device, args)
    if rank == 0:
        report["versions"] = versions()
        report["mpirun_stop"] = mpirun_stop() if report["versions"]["mpi"] else None
    return report


def mpirun_stop() -> Optional[dict]:
    """How long plain mpirun (and horovodrun's MPI mode) lets a rank checkpoint after forwarding a SIGTERM or Ctrl-C:
    Open MPI's odls_base_sigkill_timeout, as this shell would start mpirun."""
    found = open_mpi_sigkill_timeout(os.environ)
    return {"sigkill_timeout_s": found[0], "source": found[1]} if found else None


def collect_horovod(report: dict, horovod: Horovod, device, args: argparse.Namespace) -> None:
    """The collectives part: every rank runs each of them in the same order."""
    h = report["horovod"]
    h["controllers"] = horovod.report.controllers()
    mine = {"host": report["host"], "rank": report["rank"], "torch": torch.__version__, "horovod": h["version"],
            "cores": report["cores"]["usable"], "gpus": len(report["gpus"])}
    hosts = horovod.parallel.allgather_object(mine, name="doctor.hosts")
    report["hosts"] = {}
    for r in hosts:
        same = {key: r[key] for key in ("torch", "horovod", "cores", "gpus")}
        report["hosts"].setdefault(r["host"], {**same, "ranks": []})["ranks"].append(r["rank"])
    if device.type == "cuda":  # what would stop training on these GPUs: a GPU two ranks share, no NCCL
        report["gpu_placements"] = horovod.parallel.gpu_placements(device.index)
        error = horovod.parallel.gpu_error(report["gpu_placements"])
        report["problems"] += [error] if error else []
    if args.skip_bandwidth:
        report["bandwidth"], report["bandwidth_note"] = None, "skipped (--skip-bandwidth)"
    elif report["size"] < 2:
        report["bandwidth"], report["bandwidth_note"] = None, "not applicable: 1 rank (run under horovodrun -np N)"
    else:
        report["bandwidth"] = horovod.report.allreduce_bandwidth(device, args.sizes, args.iterations)
        report["bandwidth_note"] = f"{device.type} tensors, {report['size']} ranks, median of {args.iterations}"
    # The backend probe runs after the bandwidth: under Gloo, one reducescatter makes later MiB-sized allreduces
    # ~30x slower (measured with Horovod 0.28.1 on 2 ranks), and would spoil the figures above.
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    h["backends"] = horovod.report.collective_backends(devices)
    h["bfloat16_error"] = horovod.report.allreduces_bfloat16()


def diagnose(r: dict) -> tuple[list, list]:
    """(warnings, notes) for the known traps in a report."""
    warnings, notes = [], []
    h = r["horovod"]
    cores, ranks_here = r["cores"]["usable"], r["local_size"]
    threads = r["threads_per_rank"]["intra_op"]
    if ranks_here * threads > cores:
        fair = max(1, cores // ranks_here)
        warnings.append(f"{ranks_here} rank(s) on this node x {threads} threads = {ranks_here * threads} > {cores} "
                        f"usable cores: every rank slows down; set dist.threads_per_rank <= {fair}")
    omp = r["omp_num_threads"]
    if omp and omp.isdigit() and ranks_here * int(omp) > cores:
        warnings.append(f"OMP_NUM_THREADS={omp} x {ranks_here} rank(s) on this node > {cores} usable cores: OpenMP "
                        "code outside train's own thread setting oversubscribes the CPU")
    if r["precision"] == "bf16" and r["device"] == "cpu" and not r["cpu_bf16_flags"]:
        warnings.append("bf16 requested on a CPU without native bf16 (no avx512_bf16/amx_bf16): autocast emulates "
                        "it, slower than fp32; use train.precision=fp32 on this machine")
    if h.get("version"):
        for controller, name in (("mpi_built", "MPI (mpirun launches fail)"), ("gloo_built", "Gloo (no elastic "
                                 "training, horovodrun --gloo fails)")):
            if not h[controller]:
                warnings.append(f"Horovod was built without {name}")
        if not h["exit_status_patch"]:
            warnings.append("this Horovod was not installed by launch/install.sh: horovodrun --gloo can end with exit "
                            "status 0 for a job it stopped (SIGTERM, Ctrl-C), so a scheduler may count a preempted "
                            "job as finished; re-run launch/install.sh")
    if r["gpus"] and "backends" in h:
        cuda = h["backends"].get("cuda", {})
        slow = [op for op in cuda if cuda[op] != "NCCL"]
        if slow:
            warnings.append(f"Horovod serves {', '.join(slow)} of GPU tensors without NCCL (a copy through host "
                            "memory)" + (", and the sharded optimizer needs NCCL reducescatter" if "reducescatter"
                                         in slow else "") + ": rebuild with launch/install.sh --cuda")
    for host, info in r.get("hosts", {}).items():
        if (info["torch"], info["horovod"]) != (r["versions"]["torch"], h["version"]):
            warnings.append(f"{host} runs torch {info['torch']}, Horovod {info['horovod']}; rank 0 runs "
                            f"torch {r['versions']['torch']}, Horovod {h['version']}")
    stop = r.get("mpirun_stop")
    if stop and stop["sigkill_timeout_s"] < MIN_GRACE_S:
        warnings.append(f"plain mpirun (and horovodrun's MPI mode) SIGKILLs the ranks {stop['sigkill_timeout_s']} s "
                        f"after it forwards a SIGTERM or Ctrl-C (odls_base_sigkill_timeout, from {stop['source']}): "
                        f"too soon for a checkpoint; source the venv's activate (launch/install.sh sets "
                        f"{MIN_GRACE_S:.0f} s) or export {SIGKILL_VARIABLE}={MIN_GRACE_S:.0f} (the launch/ scripts "
                        "need neither)")
    if h.get("bfloat16_error"):
        notes.append("Horovod cannot allreduce bfloat16 tensors; training keeps fp32 master weights, so gradients "
                     "travel in fp32 (or fp16 with dist.compression=fp16)")
    return warnings, notes


# ---- printing ------------------------------------------------------------------------------------------------
def row(label: str, value) -> str:
    return f"  {label:<{WIDTH}}{value}".rstrip()


def rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:>9.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:>9.1f} MB/s"


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def format_report(r: dict) -> list:
    v, h = r["versions"], r["horovod"]
    lines = [f"hvd_llama doctor: {r['host']}, rank 0 of {r['size']}, {r['local_size']} rank(s) on this node",
             "versions", row("python", v["python"]),
             row("torch", f"{v['torch']} (CUDA {v['cuda'] or 'none'}, cuDNN {v['cudnn'] or 'none'}, "
                          f"NCCL {v['nccl_torch'] or 'none'})"),
             row("horovod", v["horovod"] or "not installed"), row("mpi", v["mpi"] or "no mpirun on PATH"),
             *mpirun_stop_rows(r.get("mpirun_stop")),
             row("sentencepiece", v["sentencepiece"] or "not installed"), "horovod"]
    if h["error"]:
        lines.append(row("status", "cannot be used (the problem below)"))
    else:
        lines += [row("build", f"PyTorch extension, NCCL {h['nccl_built'] or 'not built'}, CUDA "
                               f"{'built' if h['cuda_built'] else 'not built'}, launch/install.sh's patches "
                               f"{'applied' if h['exit_status_patch'] else 'missing'}"),
                  row("controllers", "; ".join(
                      f"{name} {'built' if c['built'] else 'not built'}{', in use' if c['enabled'] else ''}"
                      for name, c in (("MPI", h["controllers"]["mpi"]), ("Gloo", h["controllers"]["gloo"]))))]
        kinds = list(h["backends"])
        lines.append(row("collective", "".join(f"{k + ' tensors':<16}" for k in kinds)))
        for op in h["backends"]["cpu"]:
            lines.append(row(op, "".join(f"{h['backends'][k][op] or 'not recorded':<16}" for k in kinds)))
        for host, info in r["hosts"].items():
            lines.append(row(f"host {host}", f"ranks {','.join(map(str, info['ranks']))}, {info['cores']} cores, "
                                             f"{info['gpus']} GPU(s)"))
    t, start = r["threads_per_rank"], r["torch_threads_at_start"]
    lines += ["cpu", row("cores", f"{r['cores']['usable']} usable of {r['cores']['cpu_count']}"),
              row("native bf16", ", ".join(r["cpu_bf16_flags"]) or "no (no avx512_bf16/amx_bf16)"),
              row("torch threads", f"{start['intra_op']} intra-op, {start['inter_op']} inter-op at start-up "
                                   f"(OMP_NUM_THREADS={r['omp_num_threads'] or 'unset'})"),
              row("threads per rank", f"{t['intra_op']} x {r['local_size']} rank(s) on this node ({t['source']})"),
              "gpus"]
    lines += [row(f"cuda:{g['index']}", f"{g['name']}, {gib(g['memory_bytes'])}, compute {g['capability']}, "
                                        f"{g['uuid'] or 'UUID unknown'}")
              for g in r["gpus"]] or [row("none", "torch sees no CUDA device")]
    lines.append(f"matmul peak ({r['device']}, every rank at once)")
    for dtype, p in r["peak"].items():
        sheet = f"; datasheet {p['datasheet']['gpu']} {format_flops(p['datasheet']['flops'])}" if p["datasheet"] else ""
        lines.append(row(dtype, f"{format_flops(p['measured_flops'])} measured ({p['matmul_n']}^2), "
                                f"{format_flops(p['all_ranks_flops'])} all ranks{sheet}; MFU uses {p['mfu_uses']}"))
    if "bandwidth_note" in r:
        lines.append(f"allreduce bandwidth ({r['bandwidth_note']})")
        if r["bandwidth"]:
            lines.append(row("size", f"{'time':>10}{'algbw':>14}{'busbw':>14}"))
            lines += [row(f"{b['bytes'] / MIB:g} MiB", f"{b['seconds'] * 1e3:>8.2f}ms{rate(b['algbw_bytes_per_s'])}"
                                                       f"{rate(b['busbw_bytes_per_s'])}") for b in r["bandwidth"]]
    lines += [f"warning: {w}" for w in r["warnings"]] + [f"note: {n}" for n in r["notes"]]
    lines += [f"problem: {p}" for p in r["problems"]]
    lines.append(summary_line(r))
    return lines


def mpirun_stop_rows(stop: Optional[dict]) -> list:
    if not stop:
        return []
    return [row("mpirun stop", f"SIGKILL {stop['sigkill_timeout_s']} s after SIGTERM/Ctrl-C "
                               f"(odls_base_sigkill_timeout, from {stop['source']})")]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(r: dict) -> str:
    return f"doctor: {plural(len(r['warnings']), 'warning')}, {plural(len(r['problems']), 'problem')}"


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    if TORCH_MISSING:
        print(f"problem: torch cannot be imported ({TORCH_MISSING}); run launch/install.sh\n"
              "doctor: 0 warnings, 1 problem", flush=True)
        sys.exit(1)
    report = collect(args)
    if report["rank"] == 0:
        report["warnings"], report["notes"] = diagnose(report)
        print("\n".join(format_report(report)), flush=True)
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    sys.exit(1 if report["problems"] else 0)


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(_main, argv)


if __name__ == "__main__":
    main()
