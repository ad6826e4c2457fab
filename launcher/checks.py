"""Pre-flight checks: everything that can be found wrong before a single rank starts."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from ds_mtp.config import RunConfig
from ds_mtp.errors import UserError


def check_ds_config(cfg: RunConfig, data_parallel: int) -> dict:
    """Build the DeepSpeed config the ranks will build, so a missing file or a contradiction fails here."""
    from ds_mtp.engine import build_ds_config

    return build_ds_config(cfg, data_parallel, gpu=_gpu_count() > 0)


def is_local_address(addr: str) -> bool:
    """True when ``addr`` names this machine (binding to it succeeds only for a local interface)."""
    try:
        infos = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((sockaddr[0], 0))
                return True
        except OSError:
            continue
    return False


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is usable
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def check_ports(ports: dict[str, int]) -> None:
    """Each named port must be a valid TCP port that no process on this machine listens on."""
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise UserError(f"{name} {port} is not a TCP port (1-65535)")
        if not port_is_free(port):
            raise UserError(f"{name} {port} is already in use on this machine (another job?); "
                            f"choose another with --master-port")


def find_executable(name: str) -> str | None:
    """``name`` from this Python's environment first (a venv that is not activated), then from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def mpi_flavor(mpirun: str) -> str:
    """"openmpi" or "mpich" (MPICH, Intel MPI and MVAPICH share Hydra's flags)."""
    import subprocess

    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot run {mpirun} --version: {e}") from None
    text = out.stdout + out.stderr
    return "openmpi" if "Open MPI" in text or "OpenRTE" in text else "mpich"


def check_mpi4py() -> None:
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        raise UserError("--launcher mpirun needs mpi4py in this environment (pip install mpi4py mpich)")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpu_count() -> int:
    return _gpu_count()
