"""Starting ranks: detect an existing launch, or start the deepspeed launcher on this node."""

from __future__ import annotations

import os
import subprocess
import sys

LAUNCH_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def inside_launch() -> bool:
    """True when this process is one rank of a deepspeed / torchrun / mpirun launch."""
    return any(v in os.environ for v in LAUNCH_ENV)


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

    cmd = deepspeed_command(nproc, module_args, free_port())
    env = {**os.environ, "DS_MTP_PREPARED": "1", "PYTHONUNBUFFERED": "1"}
    if log_path is None:
        return subprocess.call(cmd, env=env)
    with open(log_path, "w") as log:
        return subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
