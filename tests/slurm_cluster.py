"""A real 2-node SLURM cluster on localhost for tests: munged, slurmctld and two slurmd (n1, n2).

Debian's packages (slurmctld, slurmd, slurm-client, munge; `make setup` installs them) run as they
would on a cluster, with these differences for one host and no root services:
- every daemon's files (config, key, sockets, spool, logs, pid files) live under one temporary
  folder, and each daemon is stopped by its pid file;
- munged runs with its own key and socket (its folder must be mode 755: munged refuses 0700);
- both slurmd share the host: `NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1` with a port
  range, started as `slurmd -N n1` / `-N n2` (SLURM reports MULTIPLE_SLURMD);
- linuxproc process tracking and no cgroups, so it runs in containers;
- `cred_expire=10` and `JobRequeue=1`: a requeued job may restart 10 s after it ended, and
  `scontrol update JobId=... StartTime=now` (:meth:`SlurmCluster.release`) skips SLURM's own
  requeue delay.
No slurmdbd, so no `sacct`: job states come from `scontrol show job`.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SlurmCluster", "missing_slurm", "slurm_cluster"]

CRED_EXPIRE_S = 10
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def missing_slurm() -> list[str]:
    """The programs this cluster needs that are not installed (empty when all are)."""
    dirs = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in DAEMONS if shutil.which(name, path=dirs) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, name
    return found


def _free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports (slurmd's Port= takes a range)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        if first + n > 65000:
            continue
        try:
            socks = []
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(first, first + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the test cluster")


SLURM_CONF = """\
ClusterName=giblettest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/ctld_state
SlurmdSpoolDir={root}/slurmd_%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd_%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd_%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_ports} CPUs=2 State=UNKNOWN
PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    """Handles to a running test cluster; :func:`slurm_cluster` starts and stops it."""

    root: Path
    conf: Path
    munge_socket: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        out = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit a batch job; its job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(
        self, job_id: int, until: tuple[str, ...], timeout: float = 150, poll: float = 0.5
    ) -> dict[str, str]:
        """Wait until the job's state is one of ``until``; the job's fields then."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')}: {info}")
            time.sleep(poll)

    def release(self, job_id: int, requeued_at: float) -> None:
        """Start a requeued (pending) job as soon as SLURM can, instead of after its requeue delay
        (~30 s here). Not sooner than ``cred_expire`` after the requeue (``requeued_at``, a
        time.monotonic() reading): slurmd revokes the job's credential for that long, and a job
        started inside that window is killed ("Job credential revoked")."""
        time.sleep(max(0.0, requeued_at + CRED_EXPIRE_S + 1 - time.monotonic()))
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def idle_nodes(self) -> list[str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t")
        return [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["idle"]]


def cluster_jobs(env: dict[str, str]) -> list[str]:
    """Job ids the cluster still runs or holds (empty when its controller is gone)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                         timeout=30, check=False)  # fmt: skip
    return out.stdout.split() if out.returncode == 0 else []


def _start(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=out, check=True, timeout=30)


def _stop_by_pid_file(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def slurm_cluster(root: Path, timeout: float = 20) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd n1/n2 under ``root``; stop them all on exit."""
    root.mkdir(parents=True, exist_ok=True)
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755, exist_ok=True)
    os.chmod(munge_dir, 0o755)
    (root / "ctld_state").mkdir(exist_ok=True)
    key = munge_dir / "munge.key"
    munge_socket = munge_dir / "munge.socket"
    subprocess.run([_which("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
    os.chmod(key, 0o600)
    ctld_port, slurmd_port, node1, node2 = _free_ports(4)
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            root=root,
            munge_socket=munge_socket,
            ctld_port=ctld_port,
            slurmd_port=slurmd_port,
            node_ports=f"{node1}-{node2}",
            cred_expire=CRED_EXPIRE_S,
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for key_name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if key_name != "SLURM_CONF":
            env.pop(key_name)
    cluster = SlurmCluster(root=root, conf=conf, munge_socket=munge_socket, env=env)
    pid_files = [
        root / "slurmd_n1.pid",
        root / "slurmd_n2.pid",
        root / "slurmctld.pid",
        munge_dir / "munged.pid",
    ]
    try:
        _start(
            [
                _which("munged"),
                "--key-file",
                str(key),
                "--socket",
                str(munge_socket),
                "--pid-file",
                str(munge_dir / "munged.pid"),
                "--log-file",
                str(munge_dir / "munged.log"),
                "--seed-file",
                str(munge_dir / "munged.seed"),
                "--force",
            ],
            env,
            root / "start.log",
        )
        _start([_which("slurmctld"), "-f", str(conf)], env, root / "start.log")
        for node in ("n1", "n2"):
            _start([_which("slurmd"), "-f", str(conf), "-N", node], env, root / "start.log")
        deadline = time.monotonic() + timeout
        while sorted(cluster.idle_nodes()) != ["n1", "n2"]:
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log"))
                )
                raise RuntimeError(f"the test cluster did not come up in {timeout} s\n{logs}")
            time.sleep(0.2)
        yield cluster
    finally:
        # Jobs first: a batch shell and its srun outlive a controller that is gone (a failed test
        # would leave them running).
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user", getpass.getuser()], env=env,
                       capture_output=True, timeout=30, check=False)  # fmt: skip
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True, timeout=30,
                       check=False)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cluster_jobs(env):
            time.sleep(0.2)
        for pid_file in pid_files:
            _stop_by_pid_file(pid_file)
