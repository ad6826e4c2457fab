"""The rank layout of a launch: which ranks train, which teach, and how trainers form pipelines and replicas.

Three things live here and nowhere else:

- ``RankLayout`` and ``check_rank_counts``: the rule that splits W ranks (the last ``teacher.ranks`` teach,
  the rest form whole pipelines of ``train.pipeline_stages``) and the arithmetic of who feeds whom;
- ``read_launch``: this process's place in the launch, read from the environment of the deepspeed launcher,
  torchrun, mpirun or srun, **without changing it**;
- ``write_role_env``: the one writer of RANK / WORLD_SIZE / LOCAL_* / MASTER_*, called once per process
  before DeepSpeed starts, so that DeepSpeed's world holds only this process's role (trainers or teachers);
- ``free_port``: a rendezvous port for a launch on this node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ds_mtp.errors import UserError

RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
"""A rank's global index, as the deepspeed launcher / torchrun, Open MPI and MPICH's Hydra set it."""
SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
LOCAL_SIZE_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
"""Ranks on this node."""
LAUNCH_MARKERS = ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
"""Any of these means the process is one rank of a launch (RANK alone may be left over in a shell)."""
SLURM_MARKER = "DS_MTP_SLURM"
"""Exported by ``ds-mtp launch --launcher slurm``: srun's tasks take their ranks from SLURM_PROCID."""
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RankLayout:
    """How the ranks of a launch split (global ranks: trainers first, then teachers).

    Only the ranks holding the MTP heads read latent targets: with a pipeline of P stages, the last stage
    of each data-parallel replica. DeepSpeed numbers trainer ranks stage-major (rank = stage x replicas +
    replica), so the fed ranks are the last ``data_parallel`` trainer ranks; replica r is fed by teacher
    r mod T.
    """

    world_size: int
    """Every rank of the launch, teachers included."""
    teacher_ranks: int
    """The last ``teacher_ranks`` ranks serve latent targets (teacher.ranks)."""
    pipeline_stages: int = 1
    """Stages of each trainer pipeline (train.pipeline_stages; 1 = ZeRO without a pipeline)."""

    @property
    def trainers(self) -> int:
        return self.world_size - self.teacher_ranks

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: whole pipelines among the trainers."""
        return self.trainers // self.pipeline_stages

    def is_teacher(self, rank: int) -> bool:
        return rank >= self.trainers

    def replica_of(self, trainer: int) -> int | None:
        """The data-parallel replica whose targets ``trainer`` reads; None for a rank without the heads."""
        first_fed = self.trainers - self.data_parallel
        return trainer - first_fed if first_fed <= trainer < self.trainers else None

    def teacher_of(self, trainer: int) -> int:
        return self.trainers + self.replica_of(trainer) % self.teacher_ranks

    def trainers_of(self, teacher: int) -> list[int]:
        """The fed trainer ranks this teacher serves, in rank order."""
        fed = range(self.trainers - self.data_parallel, self.trainers)
        return [i for i in fed if self.teacher_of(i) == teacher]

    def role_rank(self, rank: int) -> int:
        """The rank within its own role's world (trainers 0..trainers-1, teachers 0..T-1)."""
        return rank - self.trainers if self.is_teacher(rank) else rank

    def role_size(self, rank: int) -> int:
        return self.teacher_ranks if self.is_teacher(rank) else self.trainers


def check_rank_counts(world_size: int, pipeline_stages: int = 1, teacher_ranks: int = 0) -> RankLayout:
    """The one rule for splitting a launch of ``world_size`` ranks: the last ``teacher_ranks`` teach, the rest
    form whole pipelines of ``pipeline_stages``, and every teacher has a replica's last stage to feed."""
    if world_size < 1:
        raise UserError(f"a launch needs at least one rank (got {world_size})")
    trainers = world_size - teacher_ranks
    if trainers < 1:
        raise UserError(f"teacher.ranks={teacher_ranks} leaves no trainer among the launch's {world_size} rank(s)")
    if trainers % pipeline_stages:
        aside = f" ({world_size} ranks less {teacher_ranks} teacher rank(s))" if teacher_ranks else ""
        raise UserError(f"train.pipeline_stages={pipeline_stages} needs a multiple of {pipeline_stages} trainer "
                        f"ranks, got {trainers}{aside} (ranks = pipeline stages x data-parallel replicas)")
    layout = RankLayout(world_size, teacher_ranks, pipeline_stages)
    if teacher_ranks > layout.data_parallel:
        raise UserError(f"teacher.ranks={teacher_ranks} is more than the {layout.data_parallel} data-parallel "
                        "replica(s) they feed (only the last pipeline stage of each replica reads latent targets); "
                        f"use at most {layout.data_parallel}")
    return layout


def layout_of(cfg, world_size: int) -> RankLayout:
    """The layout a run config asks of ``world_size`` ranks (the ``teacher`` section is optional)."""
    teacher = getattr(cfg, "teacher", None)
    return check_rank_counts(world_size, cfg.train.pipeline_stages, int(getattr(teacher, "ranks", 0) or 0))


@dataclass(frozen=True)
class LaunchPlace:
    """This process's place in a launch, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int | None
    """Ranks on this node, when the launcher says (teachers counted)."""
    master_addr: str | None
    master_port: int | None
    via_mpi: bool
    """Started by mpirun (ranks from OMPI_*/PMI_*): rank 0's address may have to be found through MPI."""


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if env.get(name, "").strip().lstrip("-").isdigit():
            return int(env[name])
    return None


def read_launch(env: Mapping[str, str] = os.environ) -> LaunchPlace | None:
    """Where this process stands in the launch that started it, or None for a process started by hand.

    Understands the deepspeed launcher and torchrun (RANK, WORLD_SIZE, LOCAL_*), mpirun (OMPI_COMM_WORLD_* or
    PMI_*) and srun under ``ds-mtp launch --launcher slurm`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). A
    plain ``ds-mtp train`` typed inside a Slurm allocation is not a launch. Changes nothing.
    """
    slurm = env.get(SLURM_MARKER) == "1" and "RANK" not in env and "SLURM_PROCID" in env
    if slurm:
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        local_size = _first_int(env, ("SLURM_NTASKS_PER_NODE",))
    elif any(v in env for v in LAUNCH_MARKERS):
        rank, size = _first_int(env, RANK_VARS), _first_int(env, SIZE_VARS)
        if rank is None or size is None:
            return None
        local_rank = _first_int(env, LOCAL_RANK_VARS) or 0
        local_size = _first_int(env, LOCAL_SIZE_VARS)
    else:
        return None
    port = _first_int(env, ("MASTER_PORT",))
    via_mpi = not slurm and "RANK" not in env
    return LaunchPlace(rank, size, local_rank, local_size, env.get("MASTER_ADDR") or None, port, via_mpi)


def inside_launch(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one rank of a deepspeed / torchrun / mpirun / ds-mtp slurm launch."""
    return read_launch(env) is not None


def is_launch_leader(env: Mapping[str, str] = os.environ) -> bool:
    """Rank 0 of a launch, or a process started by hand."""
    place = read_launch(env)
    return place is None or place.rank == 0


def mpi_master_addr(place: LaunchPlace) -> str | None:
    """Under mpirun without MASTER_ADDR, rank 0's address (as DeepSpeed's own MPI discovery finds it).
    A collective over MPI.COMM_WORLD: every rank of an mpirun launch must call it."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD.bcast(socket.gethostbyname(socket.gethostname()) if place.rank == 0 else None, root=0)


@dataclass(frozen=True)
class Role:
    """This process in its launch: the layout, its global rank, and where the ranks meet."""

    layout: RankLayout
    rank: int
    """Global rank in the launch (teachers included)."""
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_teacher(self) -> bool:
        return self.layout.is_teacher(self.rank)


def find_role(cfg, env: Mapping[str, str] = os.environ) -> Role:
    """This process's role under ``cfg``: read from the launcher's environment (a world of one when started by
    hand), checked against the layout rule. Changes nothing, except that under mpirun without MASTER_ADDR
    every rank asks rank 0 for its address over MPI."""
    place = read_launch(env)
    if place is None:
        if cfg.teacher.ranks:
            raise UserError(f"teacher.ranks={cfg.teacher.ranks} needs a launch of several ranks (ds-mtp train "
                            "--nproc N, deepspeed or mpirun)")
        return Role(layout_of(cfg, 1), 0, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))
    addr = place.master_addr or (mpi_master_addr(place) if place.via_mpi else None) or "127.0.0.1"
    return Role(layout_of(cfg, place.world_size), place.rank, place.local_rank, addr,
                place.master_port or DEFAULT_MASTER_PORT)


def write_role_env(role: Role, local_trainers: int | None = None) -> None:
    """The one writer of the rank environment: give this process the world of its role, as DeepSpeed's env://
    rendezvous reads it (so ZeRO and pipeline grids never contain a teacher, and DeepSpeed's MPI discovery has
    nothing left to find). ``local_trainers``: the trainer ranks on this node, when teacher ranks share it
    (ds_mtp.teacher.count_local_trainers): DeepSpeed's CPU all-reduce reads LOCAL_SIZE == WORLD_SIZE as "every
    trainer is on this machine" and would wait in shared memory for peers elsewhere. Call once, before
    DeepSpeed initialises."""
    layout = role.layout
    env = {"RANK": str(layout.role_rank(role.rank)), "WORLD_SIZE": str(layout.role_size(role.rank)),
           "LOCAL_RANK": str(role.local_rank), "MASTER_ADDR": role.master_addr, "MASTER_PORT": str(role.master_port)}
    if local_trainers is not None and not role.is_teacher:
        env.update({var: str(local_trainers) for var in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if var in os.environ})
    os.environ.update(env)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free on this host together with the next one (a teacher bridge listens on MASTER_PORT + 1), chosen
    below the kernel's ephemeral range. Outgoing connections (gloo's, a teacher bridge's) take their local ports
    from that range, so a port picked there (as binding port 0 picks) can be taken between the pick and the rank
    that listens on it: seen as EADDRINUSE in a launch with a teacher rank."""
    import random

    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    if ephemeral_low > 11024:
        draw = random.Random()  # its own generator: never the seeded global one
        for _ in range(100):
            port = draw.randrange(ephemeral_low - 10000, ephemeral_low - 1)
            if _bindable(port) and _bindable(port + 1):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
