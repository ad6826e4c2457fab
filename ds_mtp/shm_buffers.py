"""Removing the shared-memory buffers DeepSpeed's CPU all-reduce leaves behind.

On one node, DeepSpeed's CPU communication (its ``shm`` op) gives every rank a buffer
``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`` of about 69 MB and never
unlinks it: every launch leaves one per rank, and /dev/shm fills up.
A launch ds-mtp started knows its master port, so when the launch has ended ds-mtp removes the buffers
named after that port (``remove_launch_buffers``). A buffer that some other live process still maps
belongs to a job that is running (a port is reused only after its launch ended), and is left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_allreduce_buffer"
"""SHM_BUFFER_NAME in DeepSpeed's csrc/cpu/comm/shm.cpp."""
_NAME = re.compile(rf"^{BUFFER_PREFIX}_(\d+)_(.+)_(\d+)_(\d+)$")


def launch_buffers(master_port: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """This user's buffers of the launch whose ranks met on ``master_port`` (any master address)."""
    if not shm_dir.is_dir():
        return []
    found = []
    for path in shm_dir.iterdir():
        match = _NAME.match(path.name)
        if match and int(match[1]) == os.getuid() and int(match[3]) == master_port:
            found.append(path)
    return sorted(found)


def mapped_by_other_processes(paths: list[Path]) -> set[Path]:
    """Those of ``paths`` that a process other than this one maps (its /proc/PID/maps names them)."""
    wanted = {str(p): p for p in paths}
    mapped: set[Path] = set()
    if not wanted:
        return mapped
    me = str(os.getpid())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == me:
            continue
        try:
            text = (proc / "maps").read_text()
        except OSError:  # gone meanwhile, or another user's
            continue
        if BUFFER_PREFIX not in text:
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset device inode [path]
            if len(fields) == 6 and (name := fields[5].removesuffix(" (deleted)")) in wanted:
                mapped.add(wanted[name])
    return mapped


def remove_launch_buffers(master_port: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the buffers of the ended launch on ``master_port`` that no live process maps; returns them."""
    buffers = launch_buffers(master_port, shm_dir)
    live = mapped_by_other_processes(buffers)
    removed = []
    for path in buffers:
        if path in live:
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
