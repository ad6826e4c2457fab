"""Starting ranks: detect an existing launch, or start the deepspeed launcher on this node."""

from __future__ import annotations

import os
import subprocess
import sys

LAUNCH_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
LOCAL_SIZE_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
"""Ranks on this node, as the deepspeed launcher, torchrun, Open MPI and MPICH's Hydra set it."""


def inside_launch() -> bool:
    """True when this process is one rank of a deepspeed / torchrun / mpirun / ds-mtp slurm launch."""
    adopt_slurm_env()
    return any(v in os.environ for v in LAUNCH_ENV)


def adopt_slurm_env() -> None:
    """Under srun started by ``ds-mtp launch --launcher slurm`` (which exports DS_MTP_SLURM=1, MASTER_ADDR
    and MASTER_PORT), take this task's rank and world from Slurm, as the deepspeed launcher would set them.
    A plain ``ds-mtp train`` inside an allocation is left alone."""
    env = os.environ
    if env.get("DS_MTP_SLURM") == "1" and "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))


def is_launch_leader() -> bool:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def deepspeed_command(nproc: int, module_args: list[str], master_port: int) -> list[str]:
    """The single-node deepspeed launcher command that runs ``python -m ds_mtp.cli <module_args>`` per rank."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(master_port), "--module", "ds_mtp.cli", *module_args]


def run_local(nproc: int, module_args: list[str], log_path=None) -> int:
    """Start ``nproc`` ranks on this node through the deepspeed launcher; returns its exit code."""
    from ds_mtp.engine import free_port
    from ds_mtp.shm_buffers import remove_launch_buffers

    master_port = free_port()
    cmd = deepspeed_command(nproc, module_args, master_port)
    env = {**os.environ, "DS_MTP_PREPARED": "1", "PYTHONUNBUFFERED": "1"}
    try:
        if log_path is None:
            return subprocess.call(cmd, env=env)
        with open(log_path, "w") as log:
            return subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:  # reliability: DeepSpeed's CPU all-reduce leaves 69 MB per rank in /dev/shm
        remove_launch_buffers(master_port)
