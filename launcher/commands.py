"""Composing the command lines: the ``deepspeed`` runner (single node, hostfile, no-ssh, its
openmpi/mpich/slurm back-ends) and a plain ``mpirun`` whose ranks find each other through mpi4py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

# Each rank runs `python -m ds_mtp.cli train ...`; the deepspeed runner adds --local_rank, which the CLI accepts.
RANK_MODULE = "ds_mtp.cli"
RANK_SCRIPT = str(Path(__file__).resolve().parent / "rank.py")
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mpich", "slurm")
LAUNCHERS = (*DEEPSPEED_LAUNCHERS, "mpirun")


def deepspeed_command(runner: list[str], train_args: list[str], *, master_port: int, nproc: int = 0,
                      hostfile: str = "", include: str = "", exclude: str = "", num_nodes: int = 0,
                      master_addr: str = "", launcher: str = "pdsh", launcher_args: str = "",
                      no_ssh: bool = False, node_rank: int = -1) -> list[str]:
    """The deepspeed runner command (``runner`` is ``[deepspeed]`` or ``[python, -m, deepspeed.launcher.runner]``);
    ``nproc`` is the ranks of a single node, or the ranks per node with a hostfile."""
    cmd = list(runner)
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if include:
        cmd += ["--include", include]
    if exclude:
        cmd += ["--exclude", exclude]
    if num_nodes:
        cmd += ["--num_nodes", str(num_nodes)]
    if nproc:
        cmd += ["--num_gpus", str(nproc)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(master_port)]
    if no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    elif hostfile and launcher != "pdsh":
        cmd += ["--launcher", launcher]
        if launcher == "slurm":
            cmd.append("--no_ssh_check")  # compute nodes of an allocation often refuse ssh; srun needs none
    if launcher_args:
        cmd += ["--launcher_args", launcher_args]
    if launcher == "slurm" and hostfile and not no_ssh:
        return [*cmd, RANK_SCRIPT, *train_args]  # DeepSpeed's slurm runner starts a file, never a module
    return [*cmd, "--module", RANK_MODULE, *train_args]


def mpirun_command(mpirun: str, flavor: str, train_args: list[str], *, world_size: int,
                   hosts: dict[str, int] | None, env: dict[str, str], launcher_args: str = "",
                   python: str = sys.executable) -> list[str]:
    """``mpirun -n W`` over ``hosts`` ({host: ranks}; None = this machine), passing ``env`` to every rank."""
    cmd = [mpirun, "-n", str(world_size)]
    if hosts:
        host_list = ",".join(f"{h}:{n}" for h, n in hosts.items())
        cmd += ["--host", host_list] if flavor == "openmpi" else ["-hosts", host_list]
    for name, value in env.items():
        cmd += ["-x", f"{name}={value}"] if flavor == "openmpi" else ["-genv", name, value]
    if launcher_args:
        cmd += shlex.split(launcher_args)
    return [*cmd, python, "-u", "-m", RANK_MODULE, *train_args]


def render(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """The command as one shell line a user can paste (environment assignments first)."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(part) for part in cmd])
