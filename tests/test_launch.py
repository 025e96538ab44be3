"""How a training process learns its rank (launch_env), the run-directory lock, and signals during
start-up. The multi-node jobs themselves run in tests/test_slurm.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from giblet_ds.run.lock import LockHolder, RunDirLockedError, RunLock
from giblet_ds.train import signal_latch
from giblet_ds.train.launch_env import LaunchError, first_host, process_env, slurm_job
from giblet_ds.train.preemption import PreemptionWatch
from tests.train_harness import REPO, TINY, TRAIN, records

SRUN_TASK = {
    "SLURM_JOB_ID": "4321",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_srun_task_takes_rank_world_and_master_from_slurm() -> None:
    got = process_env(SRUN_TASK)
    assert got.source == "slurm"
    assert got.values == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(15000 + 4321),
    }
    # The batch script's exported rendezvous wins over the derived one.
    exported = process_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"})
    assert (exported.values["MASTER_ADDR"], exported.values["MASTER_PORT"]) == ("10.0.0.7", "29500")


def test_launcher_variables_are_kept_as_given() -> None:
    env = {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    got = process_env({**env, **SRUN_TASK})  # torchrun/deepspeed inside an srun step
    assert got.source == "launcher" and got.values == env


@pytest.mark.parametrize(
    "env",
    [
        # DeepSpeed's slurm backend before: no variables the old code read, so each task became
        # rank 0 of 1; now a task outside an srun step (the batch shell) with several tasks.
        {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
        # a launcher of one process started by each of 2 srun tasks
        {**SRUN_TASK, "SLURM_NTASKS": "2", "RANK": "0", "WORLD_SIZE": "1"},
    ],
    ids=["batch-shell", "one-process-launcher-per-task"],
)
def test_a_lone_task_of_a_multi_task_job_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(
        LaunchError, match=r"SLURM_NTASKS=2 but this process would start as WORLD_SIZE=1"
    ):
        process_env(env)


def test_plain_process_is_one_rank_on_a_free_port() -> None:
    got = process_env({})
    assert got.source == "single"
    assert {k: got.values[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    assert int(got.values["MASTER_PORT"]) > 0
    assert process_env({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1"}).source == "single"


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("n1", "n1"),
        ("n[1-2]", "n1"),
        ("gpu[007-010,012]", "gpu007"),
        ("a3,b[1-4]", "a3"),
        ("x[5]", "x5"),
    ],
)
def test_first_host_of_a_hostlist(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_the_start_record_s_slurm_job() -> None:
    assert slurm_job({}) == (None, None)
    assert slurm_job({"SLURM_JOB_ID": "7"}) == ("7", 0)
    assert slurm_job({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}) == ("7", 2)


def test_unreadable_slurm_variables_are_named() -> None:
    with pytest.raises(LaunchError, match="SLURM_PROCID='x' is not an integer"):
        process_env({**SRUN_TASK, "SLURM_PROCID": "x"})
    with pytest.raises(LaunchError, match="names no host"):
        first_host("")


# ------------------------------------------------------------------------------- run lock


def _holder(**kw: object) -> LockHolder:
    base = dict(host="h1", pid=os.getpid(), slurm_job_id="77", slurm_restart_count="0", started="t")
    return LockHolder(**{**base, **kw})  # type: ignore[arg-type]


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "run.lock", _holder())
    first.acquire()
    second = RunLock(tmp_path / "run.lock", _holder(pid=1, slurm_job_id="78"))
    with pytest.raises(RunDirLockedError) as err:
        second.acquire()
    assert f"the run directory {tmp_path} is in use by another training" in str(err.value)
    assert f"host h1, pid {os.getpid()}, SLURM job 77" in str(err.value)
    assert json.loads((tmp_path / "run.lock").read_text())["slurm_job_id"] == "77"
    first.release()
    assert not (tmp_path / "run.lock").exists()
    second.acquire()  # free again
    second.release()


def test_a_lock_whose_holder_died_is_taken_over(tmp_path: Path) -> None:
    # A holder that was SIGKILLed: its file stays, its flock is gone with the process.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from giblet_ds.run.lock import RunLock;"
            " RunLock(Path(sys.argv[1])).acquire(); import os; os._exit(0)",
            str(tmp_path / "run.lock"),
        ],
        cwd=REPO,
        check=True,
    )
    assert child.returncode == 0 and (tmp_path / "run.lock").exists()
    lock = RunLock(tmp_path / "run.lock", _holder())
    lock.acquire()
    assert lock.took_over is not None and lock.took_over.pid != os.getpid()
    lock.release()


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def _write_holder(path: Path, holder: LockHolder) -> None:
    path.write_text(json.dumps(holder.__dict__) + "\n")


def test_without_flock_a_requeued_job_of_the_same_id_takes_over(
    tmp_path: Path, no_flock: None
) -> None:
    path = tmp_path / "run.lock"
    _write_holder(path, _holder(host="other-node", pid=999999, slurm_job_id="77"))
    lock = RunLock(path, _holder(host="n1", slurm_restart_count="1"))
    lock.acquire()
    assert lock.took_over is not None and lock.took_over.host == "other-node"
    lock.release()


def test_without_flock_a_dead_pid_on_this_host_is_taken_over_and_others_refused(
    tmp_path: Path, no_flock: None
) -> None:
    path = tmp_path / "run.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_holder(path, _holder(pid=dead.pid, slurm_job_id=None))
    RunLock(path, _holder(slurm_job_id=None)).acquire()
    _write_holder(path, _holder(host="other-node", pid=1, slurm_job_id="5"))
    with pytest.raises(RunDirLockedError, match=f"offers no flock.*delete {path}"):
        RunLock(path, _holder(slurm_job_id="6")).acquire()


# ------------------------------------------------------------------- signals at start-up


def test_signal_latch_records_and_the_watch_sees_an_earlier_signal() -> None:
    signal_latch.clear()
    previous = signal_latch.latch_preemption_signals()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signal_latch.received() == "SIGUSR1"
        with PreemptionWatch() as watch:  # installed after the signal: still sees it
            assert watch.received == "SIGUSR1" and watch.agreed()
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL, "the latch stays"
    finally:
        signal_latch.unlatch(previous)
        signal_latch.clear()
    assert signal.getsignal(signal.SIGUSR1) == previous[signal.SIGUSR1]


def _train_py(store: Path, run_dir: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """`python launch/train.py` on the tiny preset as a user starts it, outside any launcher or
    SLURM (this repository's giblet_ds, whatever the venv's editable install points at)."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))
    }
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY), "--deepspeed_config",
           str(REPO / "ds_configs" / "zero2_fp32_cpu.json"), "--set", f"data.store={store}",
           "--set", f"checkpoint.run_dir={run_dir}"]  # fmt: skip
    extra = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return cmd, {**clean, **extra}


def test_sigusr1_while_importing_ends_in_exit_75_and_a_preempted_end_record(
    tiny_store: Path, tmp_path: Path
) -> None:
    """Before: the default action of SIGUSR1 killed the process (-10), nothing said why."""
    run_dir = tmp_path / "run"
    cmd, env = _train_py(tiny_store, run_dir)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.0)  # importing torch and DeepSpeed takes several seconds
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGUSR1 received" in out
    (end,) = records(run_dir, "end")
    assert end["status"] == "preempted" and end["step"] == 0
    assert end["reason"] == (
        "SIGUSR1 received during start-up, before step 1: nothing new to save; "
        "the same command starts from scratch"
    )
    assert not (run_dir / "run.lock").exists()


def test_train_py_refuses_a_lone_task_of_a_two_task_job(tiny_store: Path, tmp_path: Path) -> None:
    cmd, env = _train_py(
        tiny_store, tmp_path / "run", SLURM_JOB_ID="12", SLURM_NTASKS="2", SLURM_PROCID="0"
    )
    out = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: SLURM_NTASKS=2 but this process would start as WORLD_SIZE=1" in out.stderr
    assert not (tmp_path / "run").exists(), "nothing written"
