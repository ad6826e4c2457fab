"""ds_mtp.ranks: the layout rule, the reader of the launcher's environment (which changes nothing) and the one
writer of the rank environment."""

import os

import pytest

from ds_mtp.config import load_config
from ds_mtp.errors import UserError
from ds_mtp.ranks import (RankLayout, check_rank_counts, find_role, inside_launch, is_launch_leader, read_launch,
                          write_role_env)

RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "DS_MTP_SLURM", "SLURM_PROCID",
            "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def clean_env(monkeypatch):
    for var in RANK_ENV:
        monkeypatch.setenv(var, "")  # recorded, so that what write_role_env sets is undone afterwards
        monkeypatch.delenv(var)
    return monkeypatch


def test_layout_sets_teacher_ranks_aside_before_dividing_by_stages():
    layout = check_rank_counts(5, pipeline_stages=2, teacher_ranks=1)
    assert (layout.trainers, layout.data_parallel) == (4, 2)
    with pytest.raises(UserError, match=r"train.pipeline_stages=2 needs a multiple of 2 trainer ranks, got 3 \(4 "
                                        r"ranks less 1 teacher rank\(s\)\)"):
        check_rank_counts(4, pipeline_stages=2, teacher_ranks=1)
    with pytest.raises(UserError, match="leaves no trainer"):
        check_rank_counts(2, pipeline_stages=1, teacher_ranks=2)
    with pytest.raises(UserError, match="at least one rank"):
        check_rank_counts(0)
    # only the last stage of each replica reads targets: a teacher per replica at most
    assert check_rank_counts(6, pipeline_stages=2, teacher_ranks=2).data_parallel == 2
    with pytest.raises(UserError, match=r"teacher.ranks=2 is more than the 1 data-parallel replica\(s\) they feed"):
        check_rank_counts(4, pipeline_stages=2, teacher_ranks=2)


def test_layout_feeds_the_last_pipeline_stage_of_each_replica():
    # 2 stages x 2 replicas + 2 teachers: DeepSpeed's ranks are stage-major, so ranks 2 and 3 hold the heads
    layout = RankLayout(6, 2, pipeline_stages=2)
    assert (layout.trainers, layout.data_parallel) == (4, 2)
    assert [layout.replica_of(r) for r in range(4)] == [None, None, 0, 1]
    assert layout.trainers_of(4) == [2] and layout.trainers_of(5) == [3]
    assert [layout.role_rank(r) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [layout.role_size(r) for r in (0, 5)] == [4, 2]
    # ZeRO: every trainer is fed, replicas shared round-robin among teachers
    zero = RankLayout(4, 1)
    assert [zero.replica_of(r) for r in range(3)] == [0, 1, 2] and zero.trainers_of(3) == [0, 1, 2]


@pytest.mark.parametrize("env, place", [
    ({}, None),                                                             # started by hand
    ({"RANK": "3"}, None),                                                  # a RANK left over in a shell
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "MASTER_ADDR": "n0",
      "MASTER_PORT": "29600"}, (1, 4, 1, 2, "n0", 29600, False)),           # deepspeed launcher
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, (2, 3, 0, 1, None, None, True)),  # Open MPI
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, (0, 2, 0, None, None, None, True)),  # MPICH
])
def test_read_launch_understands_each_launcher_and_changes_nothing(clean_env, env, place):
    for var, value in env.items():
        clean_env.setenv(var, value)
    before = dict(os.environ)
    got = read_launch()
    assert dict(os.environ) == before
    assert (None if got is None else (got.rank, got.world_size, got.local_rank, got.local_size, got.master_addr,
                                      got.master_port, got.via_mpi)) == place
    assert inside_launch() == (place is not None) and is_launch_leader() == (place is None or place[0] == 0)


def test_slurm_tasks_take_rank_and_world_from_slurm_only_under_ds_mtp_launch(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert not inside_launch()  # `ds-mtp train` typed inside an allocation is a single process
    clean_env.setenv("DS_MTP_SLURM", "1")
    place = read_launch()
    assert (place.rank, place.world_size, place.local_rank) == (3, 8, 1) and "RANK" not in os.environ


def _cfg(token_data, *overrides):
    return load_config(None, [f"data.path={token_data}", "model.preset=tiny", "model.mtp_k=3", *overrides])


@pytest.mark.parametrize("env, role", [
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "LOCAL_SIZE": "3"}, ("trainer", "0", "2", "3")),
    ({"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "3", "LOCAL_SIZE": "3"}, ("teacher", "0", "1", "3")),
    # node 1 of two, as deepspeed numbers local ranks (global rank mod ranks per node): one trainer here
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3", "LOCAL_SIZE": "2"}, ("trainer", "1", "2", "1")),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "LOCAL_SIZE": "2"}, ("teacher", "0", "1", "2")),
])
def test_the_writer_gives_each_role_its_own_world(clean_env, token_data, teacher_dir, env, role):
    for var, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"}.items():
        clean_env.setenv(var, value)
    found = find_role(_cfg(token_data, "teacher.ranks=1", f"teacher.source=checkpoint:{teacher_dir}"))
    assert os.environ["RANK"] == env["RANK"]  # finding the role wrote nothing
    local_trainers = 1 if env["LOCAL_SIZE"] == "2" and role[0] == "trainer" else None
    write_role_env(found, local_trainers)
    assert ("teacher" if found.is_teacher else "trainer", os.environ["RANK"], os.environ["WORLD_SIZE"],
            os.environ["LOCAL_SIZE"]) == role
    assert os.environ["LOCAL_RANK"] == env["LOCAL_RANK"]  # the device a rank takes on its node
    assert found.master_port == 29600 and found.rank == int(env["RANK"])


def test_a_process_started_by_hand_is_a_world_of_one(clean_env, token_data):
    with pytest.raises(UserError, match="teacher.ranks=1 needs a launch of several ranks"):
        find_role(_cfg(token_data, "teacher.ranks=1", "teacher.source=checkpoint:x"))
    role = find_role(_cfg(token_data))
    assert (role.rank, role.layout.world_size, role.master_addr) == (0, 1, "127.0.0.1")
    write_role_env(role)
    assert [os.environ[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["0", "1", "0"]


def test_local_trainers_are_counted_by_host(monkeypatch, clean_env, token_data, teacher_dir):
    import socket

    import torch.distributed as dist

    from ds_mtp.ranks import Role
    from ds_mtp.teacher import count_local_trainers

    store = dist.HashStore()
    store.set("ds_mtp_host/0", "node-0")  # trainer 0 on another machine; trainer 1 and the teacher here
    monkeypatch.setattr(socket, "gethostname", lambda: "node-1")
    assert count_local_trainers(store, Role(RankLayout(3, 1), 1, 0, "127.0.0.1", 0)) == 1


def test_nothing_but_the_writer_sets_the_rank_environment():
    """RANK / WORLD_SIZE / LOCAL_* / MASTER_* are written in ds_mtp/ranks.py only (the one writer)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    writes = re.compile(r"environ(\.update\(|\.setdefault\(|\[[^\]]+\]\s*=)")
    offenders = [str(p.relative_to(repo)) for pkg in ("ds_mtp", "launcher", "data_prep") for p in (repo / pkg).rglob("*.py")
                 if p.name != "ranks.py" and any(("RANK" in line or "WORLD_SIZE" in line or "MASTER_" in line
                                                  or "LOCAL_" in line) and writes.search(line)
                                                 for line in p.read_text().splitlines())]
    assert offenders == []
