"""Multi-node training on a real 2-node SLURM cluster (tests/slurm_cluster.py), through the shipped
launch/slurm_train.sbatch with only its GPU request removed (CPU nodes, GPUS_PER_NODE=1, one task
and one CPU per node), and DeepSpeed's hostfile path without SLURM.

Every job trains the tiny preset for 8 steps on 2 ranks, one per node; the uninterrupted job is
the reference that the preempted-and-requeued jobs must reproduce bit for bit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import SlurmCluster, missing_slurm, slurm_cluster
from tests.train_harness import DS_BIN, REPO, TINY, free_port, losses_by_step, records

pytestmark = pytest.mark.distributed

SBATCH = REPO / "launch" / "slurm_train.sbatch"
DS_JSON = "ds_configs/zero2_fp32_cpu.json"
COMMON = (
    "train.max_steps=8",
    "checkpoint.save_every_steps=2",
    "checkpoint.keep_last=5",
    "train.val_every_steps=3",
)
FINAL_TAG = "step-00000008"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    missing = missing_slurm()
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing; `make setup` installs it)"
        )
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def cpu_sbatch_script(folder: Path) -> Path:
    """The shipped script without its GPU request (the only change, as a CPU cluster needs)."""
    lines = SBATCH.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("#SBATCH --gpus")]
    assert len(kept) == len(lines) - 1, "the script's one GPU line moved: update this test"
    path = folder / "slurm_train_cpu.sbatch"
    path.write_text("".join(kept))
    return path


def submit(
    cluster: SlurmCluster,
    folder: Path,
    run_dir: Path,
    store: Path,
    *,
    nodes: int = 2,
    sbatch_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> int:
    """Submit the CPU copy of the shipped script from the repository, as a user would."""
    sets = [f"data.store={store}", f"checkpoint.run_dir={run_dir}", *COMMON]
    job_env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        **(env or {}),
    }
    args = [
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        f"--output={folder}/slurm-%j.out",
        *sbatch_args,
        str(cpu_sbatch_script(folder)),
        str(TINY),
        DS_JSON,
    ]
    for item in sets:
        args += ["--set", item]
    return cluster.sbatch(*args, env=job_env, cwd=REPO)


def job_output(folder: Path, job_id: int) -> str:
    path = folder / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def wait_for(predicate, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def train_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r["step"] for r in records(run_dir, "train")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(
        run_dir / "checkpoints" / FINAL_TAG / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    return state["module"]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = final_weights(run_dir), final_weights(reference)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def wait_requeued(cluster: SlurmCluster, job_id: int, timeout: float = 120) -> dict[str, str]:
    """Wait until the job was requeued once and is pending again."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            return info
        assert info.get("JobState") not in ENDED, f"job {job_id} ended instead: {info}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} was not requeued: {info}")
        time.sleep(0.2)


class TwoJobs:
    """One 2-node job, and a second job submitted on its run directory while it trains."""

    def __init__(self, cluster: SlurmCluster, folder: Path, store: Path) -> None:
        self.folder, self.run_dir = folder, folder / "run"
        repo_before = sorted(p.name for p in REPO.iterdir())
        # Slow steps leave time for the second job to meet the first one's lock.
        self.first = submit(
            cluster, folder, self.run_dir, store, env={"GIBLET_FAULT_SLOW_STEPS": "0.5"}
        )
        wait_for(lambda: (self.run_dir / "run.lock").exists(), "the first job's lock", 120)
        self.second = submit(cluster, folder, self.run_dir, store, nodes=1)
        self.second_info = cluster.wait(self.second, ENDED)
        self.second_train_steps_seen = train_steps(self.run_dir)
        self.first_info = cluster.wait(self.first, ENDED)
        self.repo_after = sorted(p.name for p in REPO.iterdir())
        self.repo_before = repo_before


@pytest.fixture(scope="module")
def two_jobs(
    cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, tiny_store: Path
) -> TwoJobs:
    return TwoJobs(cluster, tmp_path_factory.mktemp("two_jobs"), tiny_store)


def test_two_nodes_train_one_job_of_world_size_two(two_jobs: TwoJobs) -> None:
    info, run_dir = two_jobs.first_info, two_jobs.run_dir
    assert info["JobState"] == "COMPLETED", job_output(two_jobs.folder, two_jobs.first)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]"
    (start,) = records(run_dir, "start")
    assert start["world_size"] == 2 and start["launch"] == "slurm"
    assert start["slurm_job_id"] == str(two_jobs.first) and start["slurm_restart_count"] == 0
    (end,) = records(run_dir, "end")
    assert end["status"] == "finished" and end["step"] == 8
    assert sorted(losses_by_step(run_dir)) == list(range(1, 9))
    assert (run_dir / "checkpoints" / "latest").read_text() == FINAL_TAG
    assert not (run_dir / "run.lock").exists(), "the lock is released at exit"
    assert two_jobs.repo_after == two_jobs.repo_before, "nothing left in the working directory"


def test_second_job_on_the_same_run_dir_refuses_and_the_first_is_unharmed(
    two_jobs: TwoJobs,
) -> None:
    info = two_jobs.second_info
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    out = job_output(two_jobs.folder, two_jobs.second)
    assert "is in use by another training (host " in out
    assert f"SLURM job {two_jobs.first}" in out
    assert two_jobs.second_train_steps_seen != list(range(1, 9)), "refused while the first ran"
    # The first job: one start record, every step once, finished.
    assert len(records(two_jobs.run_dir, "start")) == 1
    assert train_steps(two_jobs.run_dir) == list(range(1, 9))
    assert two_jobs.first_info["JobState"] == "COMPLETED"


def _requeue_cycle(
    cluster: SlurmCluster, job_id: int, run_dir: Path, folder: Path, reference: Path
) -> None:
    """After the job saved and exited 75: requeued once, resumed on 2 ranks, same final weights."""
    wait_requeued(cluster, job_id)
    requeued_at = time.monotonic()
    # 60 min: beyond the script's USR1@600 warning (a 10-minute limit would fire it at once)
    cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=60")
    cluster.release(job_id, requeued_at)
    info = cluster.wait(job_id, ENDED)
    assert info["JobState"] == "COMPLETED", job_output(folder, job_id)
    assert info["Restarts"] == "1"
    starts, ends = records(run_dir, "start"), records(run_dir, "end")
    assert [s["slurm_restart_count"] for s in starts] == [0, 1]
    assert [s["world_size"] for s in starts] == [2, 2]
    assert [e["status"] for e in ends] == ["preempted", "finished"]
    assert starts[1]["start_step"] == ends[0]["step"]
    assert "requeueing job" in job_output(folder, job_id)
    assert_same_weights(run_dir, reference)
    assert losses_by_step(run_dir) == losses_by_step(reference)


def test_scancel_usr1_saves_exits_75_requeues_and_resumes_bit_identically(
    cluster: SlurmCluster, two_jobs: TwoJobs, tmp_path: Path, tiny_store: Path
) -> None:
    run_dir = tmp_path / "run"
    job_id = submit(cluster, tmp_path, run_dir, tiny_store, env={"GIBLET_FAULT_SLOW_STEPS": "1"})
    wait_for(lambda: len(train_steps(run_dir)) >= 3, "three steps", 120)
    cluster.run("scancel", "--signal=USR1", str(job_id))
    _requeue_cycle(cluster, job_id, run_dir, tmp_path, two_jobs.run_dir)
    first_end = records(run_dir, "end")[0]
    assert 3 <= first_end["step"] < 8
    assert first_end["reason"].startswith(
        f"SIGUSR1 received: stopped after step {first_end['step']}"
    )


def test_time_limit_signal_saves_exits_75_requeues_and_resumes(
    cluster: SlurmCluster, two_jobs: TwoJobs, tmp_path: Path, tiny_store: Path
) -> None:
    """--time=1 --signal=USR1@55: SLURM signals 5 s after the start at the earliest (its timer
    checks every ~30 s). Slow steps keep the run going past that; the requeued job gets a longer
    limit (60 min: beyond the script's own --signal=USR1@600, which a 10-minute limit would fire at
    once), as a real requeue that restarts with its full time would not see the signal again."""
    run_dir = tmp_path / "run"
    job_id = submit(
        cluster,
        tmp_path,
        run_dir,
        tiny_store,
        sbatch_args=("--time=1", "--signal=USR1@55"),
        env={"GIBLET_FAULT_SLOW_STEPS": "5"},
    )
    _requeue_cycle(cluster, job_id, run_dir, tmp_path, two_jobs.run_dir)
    assert records(run_dir, "end")[0]["reason"].startswith("SIGUSR1 received")


def test_deepspeed_hostfile_without_ssh_two_launchers_form_one_job(
    two_jobs: TwoJobs, tmp_path: Path, tiny_store: Path
) -> None:
    """DeepSpeed's multi-node path without SLURM or ssh: one launcher per node (`--no_ssh
    --node_rank`), the same hostfile and rendezvous; here both "nodes" are this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "run"
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    args = ["--config", str(TINY), "--deepspeed_config", DS_JSON]
    for item in (f"data.store={tiny_store}", f"checkpoint.run_dir={run_dir}", *COMMON):
        args += ["--set", item]
    import subprocess

    launchers = [
        subprocess.Popen(
            [
                str(DS_BIN),
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "launch/train.py",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    (start,) = records(run_dir, "start")
    assert start["world_size"] == 2 and start["launch"] == "launcher"
    assert start["slurm_job_id"] is None
    assert_same_weights(run_dir, two_jobs.run_dir)
