"""How long a stop may take (hvd_llama/training/preemption.py): train.stop_grace_s=0 sized from the checkpoint's bytes and
the last save's speed, each save timed and logged, and rank 0's warning when the launcher's notice is shorter than
a stop needs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from support.trainrun import metrics, micro_overrides, train_single

from hvd_llama.cli import UserError
from hvd_llama.training.metrics import MetricsLogger
from hvd_llama.training.preemption import (
    ASSUMED_BYTES_PER_S,
    MIN_GRACE_S,
    StopBudget,
    StopTime,
    estimated_checkpoint_bytes,
    folder_bytes,
    launcher_notice,
    parse_ompi_info,
    shortfall,
)

GB = 1e9
LLAMA_7B = 6_738_415_616  # parameters (README: published count, checked on the meta device)


def test_a_7b_checkpoint_is_estimated_at_the_size_the_issue_measured():
    """~80 GB of optimizer slices (moments and fp32 master) + 27 GB model.pt, before any save is timed."""
    assert estimated_checkpoint_bytes(LLAMA_7B, LLAMA_7B) / GB == pytest.approx(107.8, abs=0.1)
    lora = estimated_checkpoint_bytes(LLAMA_7B, 4_194_304)  # adapters train alone: the weights dominate
    assert lora / GB == pytest.approx(27.0, abs=0.1)


@pytest.mark.parametrize("checkpoint_bytes, bytes_per_s, step_s, needed, grace", [
    (107.8 * GB, 1 * GB, 4.0, 111.8, 223.6),   # a 7B save at 1 GB/s: twice the step and the save
    (107.8 * GB, 0.2 * GB, 4.0, 543.0, 1086.0),  # the same on a slow filesystem
    (2e6, 8e6, 0.1, 0.35, MIN_GRACE_S),        # a micro model: never under the old fixed 60 s
])
def test_grace_is_twice_a_step_and_a_save_and_at_least_60_s(checkpoint_bytes, bytes_per_s, step_s, needed, grace):
    budget = StopBudget(int(checkpoint_bytes), bytes_per_s, measured=True, step_s=step_s)
    assert budget.needed_s == pytest.approx(needed)
    assert budget.grace_s == pytest.approx(grace)


OMPI_INFO = """mca:odls:base:param:odls_base_max_threads:value:4
mca:odls:base:param:odls_base_sigkill_timeout:value:11
mca:odls:base:param:odls_base_sigkill_timeout:source:file (/home/u/.openmpi/mca-params.conf:1)
mca:odls:base:param:odls_base_sigkill_timeout:status:read-only
"""


def test_ompi_info_parsable_output_gives_the_value_and_its_source():
    assert parse_ompi_info(OMPI_INFO) == (11, "file (/home/u/.openmpi/mca-params.conf:1)")
    assert parse_ompi_info("mca:odls:base:param:odls_base_max_threads:value:4\n") is None


@pytest.mark.parametrize("env, seconds, source", [
    ({"HVD_LLAMA_STOP_NOTICE_S": "120", "HVD_LLAMA_LAUNCHER_PID": "1"}, 120, "HVD_LLAMA_STOP_NOTICE_S=120"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_MCA_odls_base_sigkill_timeout": "60"}, 60,
     "odls_base_sigkill_timeout=60, from OMPI_MCA_odls_base_sigkill_timeout"),
    ({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1"}, 5, "horovodrun --gloo"),
    ({"OMPI_COMM_WORLD_RANK": "0", "HVD_LLAMA_LAUNCHER_PID": "1"}, None, None),  # our scripts: never signalled
    ({"SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "0"}, None, None),  # srun: only --signal is known, if passed on
    ({}, None, None),  # a plain process
])
def test_the_launchers_notice_from_the_ranks_environment(env, seconds, source):
    notice = launcher_notice(env)
    assert (notice and notice.seconds) == seconds
    assert notice is None or source in notice.source


def test_open_mpi_without_the_variable_asks_ompi_info_which_reads_the_users_file(tmp_path, monkeypatch):
    """A value in ~/.openmpi/mca-params.conf does not reach the ranks' environment: ompi_info sees it."""
    (tmp_path / ".openmpi").mkdir()
    (tmp_path / ".openmpi" / "mca-params.conf").write_text("odls_base_sigkill_timeout = 13\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("OMPI_MCA_odls_base_sigkill_timeout", raising=False)
    notice = launcher_notice({"OMPI_COMM_WORLD_RANK": "1"})
    assert notice.seconds == 13 and "mca-params.conf" in notice.source


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_notice_is_one_line_naming_it(value):
    with pytest.raises(UserError, match=f"^HVD_LLAMA_STOP_NOTICE_S={value}: expected the seconds"):
        launcher_notice({"HVD_LLAMA_STOP_NOTICE_S": value})


SLOW_7B = StopBudget(int(107.8 * GB), 1 * GB, measured=True, step_s=4.0)  # a stop needs ~112 s


def test_shortfall_names_the_shorter_limit_and_what_to_ask_for():
    slurm = launcher_notice({"HVD_LLAMA_STOP_NOTICE_S": "120"})
    assert shortfall(SLOW_7B, 0.0, slurm) is None  # 120 s cover it
    mpirun = launcher_notice({"OMPI_COMM_WORLD_RANK": "0", "OMPI_MCA_odls_base_sigkill_timeout": "60"})
    warning = shortfall(SLOW_7B, 0.0, mpirun)
    assert warning.startswith("plain mpirun (odls_base_sigkill_timeout=60, ")
    assert "about 112 s: a step of 4.0 s and a checkpoint of 107.8 GB at 1.0 GB/s" in warning
    assert "export OMPI_MCA_odls_base_sigkill_timeout=224 " in warning  # the grace train would give itself
    explicit = shortfall(SLOW_7B, 60.0, slurm)
    assert explicit.startswith("train.stop_grace_s=60 is shorter than a stop needs (about 112 s")


class OneRank:
    """hvd_llama.parallel for one process, as StopTime uses it."""
    @staticmethod
    def broadcast_object(obj, name):
        return obj

    @staticmethod
    def is_main():
        return True


def flag():
    """A StopFlag's state as StopTime sees it (a real one installs signal handlers in the test process)."""
    return SimpleNamespace(grace_s=MIN_GRACE_S, reason="")


def test_the_grace_follows_the_longest_step_and_stays_put_once_a_stop_counts_down():
    stop_flag, model = flag(), SimpleNamespace(parameters=lambda: [])
    stop = StopTime.begin(stop_flag, 0.0, model, {"save_bytes": int(107.8 * GB), "save_bytes_per_s": 1 * GB},
                          OneRank)
    assert stop.budget.measured and stop_flag.grace_s == pytest.approx(2 * 107.8)
    stop.stepped(30.0)  # the session's first step (start-up work) is replaced by the second
    stop.stepped(4.0)
    stop.stepped(3.0)
    assert stop.budget.step_s == 4.0 and stop_flag.grace_s == pytest.approx(2 * (107.8 + 4.0))
    stop_flag.reason = "a signal (SIGTERM)"
    stop.stepped(50.0)
    assert stop_flag.grace_s == pytest.approx(2 * (107.8 + 4.0))  # a countdown under way keeps its length
    fixed = flag()
    StopTime.begin(fixed, 90.0, model, {"save_bytes": int(107.8 * GB), "save_bytes_per_s": 1 * GB}, OneRank)
    assert fixed.grace_s == MIN_GRACE_S  # an explicit train.stop_grace_s wins (train's StopFlag holds it)


def test_before_any_save_the_checkpoint_is_estimated_at_the_assumed_speed():
    params = [SimpleNamespace(numel=lambda: LLAMA_7B, requires_grad=True)]
    stop_flag = flag()
    stop = StopTime.begin(stop_flag, 0.0, SimpleNamespace(parameters=lambda: params), None, OneRank)
    assert not stop.budget.measured and stop.budget.bytes_per_s == ASSUMED_BYTES_PER_S
    assert stop_flag.grace_s == pytest.approx(2 * 16 * LLAMA_7B / ASSUMED_BYTES_PER_S)


def test_a_save_is_timed_with_the_drills_delay_logged_on_its_steps_record_and_read_back(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, True, tensorboard=False, console_every=1)
    for step in (1, 2):
        logger.log_step({"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": 0.0,
                         "eta_s": 0.0}, 2)
    checkpoint = run_dir / "checkpoints" / "step_00000002"

    def save():
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.pt").write_bytes(b"x" * 300_000)
        (checkpoint / "manifest.json").write_text("{}")
        return checkpoint

    stop = StopTime(flag(), 0.0, StopBudget(1, 1.0, measured=False), OneRank, delay_s=0.3)
    assert stop.save(save, logger) == checkpoint
    logger.close()
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2] and "save_s" not in records[0]
    saved = records[1]
    assert saved["loss"] == 1.0 and saved["save_s"] >= 0.3  # the delay comes before the write, inside the timing
    assert saved["save_bytes"] == folder_bytes(checkpoint) == 300_002
    assert saved["save_bytes_per_s"] == pytest.approx(saved["save_bytes"] / saved["save_s"])
    assert saved["stop_grace_s"] == MIN_GRACE_S
    resumed = MetricsLogger(run_dir, True, tensorboard=False, console_every=1, resume_step=2)
    assert resumed.last_save == saved
    resumed.close()


def test_the_warning_is_given_once(capsys, monkeypatch):
    monkeypatch.setenv("HVD_LLAMA_STOP_NOTICE_S", "120")
    stop = StopTime(flag(), 0.0, StopBudget(int(300 * GB), 1 * GB, measured=True), OneRank)
    stop.stepped(1.0)
    assert capsys.readouterr().err == ""  # the session's first step: start-up's time, not a step's
    for _ in range(3):
        stop.stepped(1.0)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: the launcher (HVD_LLAMA_STOP_NOTICE_S=120, ")
    assert warnings[0].endswith("e.g. #SBATCH --signal=USR1@602 in launch/train_slurm.sbatch "
                                "(and HVD_LLAMA_STOP_NOTICE_S=602)")


@pytest.mark.slow  # two training sessions, one with 2 s saves
def test_a_resumed_run_sizes_its_stop_from_the_last_saves_speed_and_warns_at_start_up(data_dir, tmp_path):
    """Session 1 saves slowly (the drill's 2 s) and logs it; session 2, whose own saves are fast, starts from that
    measurement: the SLURM notice of 1 s it is given is too short, and it says so before it saves anything."""
    run_dir = tmp_path / "run"
    first = train_single(run_dir, micro_overrides(data_dir, **{"train.max_steps": 3, "log.tensorboard": False}),
                         env={"HVD_LLAMA_SAVE_DELAY_S": "2"}, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = metrics(run_dir)[-1]
    assert saved["step"] == 3 and saved["save_s"] >= 2
    assert saved["save_bytes"] == folder_bytes(run_dir / "checkpoints" / "step_00000003")
    assert (f"checkpoint step_00000003: {saved['save_bytes'] / 1e6:.1f} MB in {saved['save_s']:.2f} s"
            in first.stdout)
    assert "warning" not in first.stderr  # no launcher, no notice
    second = train_single(run_dir, micro_overrides(data_dir, **{"train.max_steps": 6, "log.tensorboard": False,
                                                                "checkpoint.every": 0}), "--resume", "auto",
                          env={"HVD_LLAMA_STOP_NOTICE_S": "1"}, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    [warning] = [line for line in second.stderr.splitlines() if line.startswith("warning: ")]
    speed = saved["save_bytes_per_s"] / 1e6
    assert warning.startswith("warning: the launcher (HVD_LLAMA_STOP_NOTICE_S=1, ")
    assert f"MB at {speed:.1f} MB/s, measured at the last save" in warning
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["save_s"] < saved["save_s"]
