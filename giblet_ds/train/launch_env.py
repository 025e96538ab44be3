"""How ranks find each other: the process-group variables from whichever launcher started us.

``torch.distributed`` (through ``deepspeed.init_distributed``) reads RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Three launchers are supported, and this module is the one place that
knows them:

- ``deepspeed`` and ``torchrun`` set all five: they are used as given;
- ``srun`` (one task per GPU, launch/slurm_train.sbatch) sets SLURM's own variables, mapped as
  Lightning's ``SLURMEnvironment`` does: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
  LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of SLURM_JOB_NODELIST (unless the
  batch script exported one), MASTER_PORT = 15000 + SLURM_JOB_ID mod 10000 (the same for a
  requeued job, unless exported); no ssh between nodes, no MPI;
- a plain ``python launch/train.py`` is one process: rank 0 of 1 on a free local port.

A process that SLURM started as one of several tasks (SLURM_NTASKS > 1) but that would start as a
world of one is refused with the variables named (:class:`LaunchError`): that is how a 2-node job
silently became two independent runs of one rank each.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from giblet_ds.errors import GibletError

__all__ = [
    "LaunchError",
    "ProcessEnv",
    "fill_process_env",
    "first_host",
    "process_env",
    "slurm_job",
]

PROCESS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 10000  # 15000-24999: below Linux's ephemeral ports


class LaunchError(GibletError):
    """The launcher's variables describe no consistent process group."""


@dataclass(frozen=True)
class ProcessEnv:
    """What this process will start as, and where that came from."""

    values: dict[str, str]
    """The five process-group variables to set (those already set are repeated unchanged)."""
    source: str
    """``launcher`` (deepspeed, torchrun), ``slurm`` (srun tasks) or ``single`` (plain python)."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``n[1-2],m3`` -> ``n1``; ``gpu[007-010]`` -> ``gpu007``.

    Raises :class:`LaunchError` on an empty or malformed list (``scontrol show hostnames`` is the
    reference expansion; this reads only the first name, so no scontrol is needed on the node)."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if not match or not match.group(1):
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges)[0].strip()
    if not first.isdigit():
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read its first host")
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def _refuse_lone_task(env: Mapping[str, str], world: int) -> None:
    tasks = env.get("SLURM_NTASKS")
    if world == 1 and tasks and tasks.isdigit() and int(tasks) > 1:
        raise LaunchError(
            f"SLURM_NTASKS={tasks} but this process would start as WORLD_SIZE=1"
            f" (RANK={env.get('RANK', 'unset')}, SLURM_STEP_ID={env.get('SLURM_STEP_ID', 'unset')}):"
            " it would train alone beside the job's other tasks. Start one task per GPU with srun"
            " (launch/slurm_train.sbatch does), which sets SLURM_PROCID and SLURM_NTASKS, or ask"
            " SLURM for one task (--ntasks=1) when one process is meant"
        )


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def process_env(env: Mapping[str, str]) -> ProcessEnv:
    """The process-group variables for a process started with environment ``env``.

    Raises :class:`LaunchError` for a lone task of a multi-task SLURM job, or unreadable SLURM
    variables."""
    if "RANK" in env and "WORLD_SIZE" in env:
        _refuse_lone_task(env, _int(env, "WORLD_SIZE"))
        values = {k: env[k] for k in PROCESS_VARS if k in env}
        values.setdefault("LOCAL_RANK", "0")
        return ProcessEnv(values=values, source="launcher")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # A task of an srun step (the batch shell has SLURM_PROCID too, but no step id).
        world = _int(env, "SLURM_NTASKS")
        job_id = _int(env, "SLURM_JOB_ID")
        values = {
            "RANK": str(_int(env, "SLURM_PROCID")),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(_int(env, "SLURM_LOCALID")),
            "MASTER_ADDR": env.get("MASTER_ADDR")
            or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")),
            "MASTER_PORT": env.get("MASTER_PORT")
            or str(SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN),
        }
        return ProcessEnv(values=values, source="slurm")
    _refuse_lone_task(env, 1)
    values = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or _free_port(),
    }
    return ProcessEnv(values=values, source="single")


def fill_process_env(env: MutableMapping[str, str] | None = None) -> ProcessEnv:
    """Set the process-group variables in ``env`` (default: ``os.environ``); see :func:`process_env`."""
    target = os.environ if env is None else env
    resolved = process_env(target)
    target.update(resolved.values)
    return resolved


def slurm_job(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    """The SLURM job a process runs in, for its start record: the job id (the same for every
    requeue) and the restart count (0 on the first start); both None outside SLURM."""
    job_id = env.get("SLURM_JOB_ID")
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return job_id, int(restarts) if job_id and restarts.isdigit() else None
