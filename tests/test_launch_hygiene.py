"""What a launch leaves on the machine: one extension cache per environment, no DeepSpeed buffers in /dev/shm."""

import mmap
import os
import subprocess
import sys

import pytest

from ds_mtp.extensions import environment_extensions_dir, use_environment_extensions_dir
from ds_mtp.shm_buffers import launch_buffers, remove_launch_buffers


def test_each_environment_gets_its_own_extension_cache_unless_the_user_chose_one(tmp_path, monkeypatch):
    assert environment_extensions_dir(str(tmp_path)) == tmp_path / "torch_extensions"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a system Python this user cannot write to
    system = environment_extensions_dir("/usr")
    assert system.parent == tmp_path / "cache" / "torch_extensions" and system != environment_extensions_dir("/opt")
    monkeypatch.undo()
    env = {}
    assert use_environment_extensions_dir(env) == str(environment_extensions_dir()) == env["TORCH_EXTENSIONS_DIR"]
    env = {"TORCH_EXTENSIONS_DIR": "/mine"}
    assert use_environment_extensions_dir(env) == "/mine"


def test_the_cli_sets_the_cache_before_anything_starts(monkeypatch):
    from ds_mtp.cli import main

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(environment_extensions_dir())


def _buffer(shm, port, rank, uid=None, addr="127.0.0.1"):
    path = shm / f"deepspeed_allreduce_buffer_{os.getuid() if uid is None else uid}_{addr}_{port}_{rank}"
    path.write_bytes(b"\0" * 4096)
    return path


def test_the_buffers_of_an_ended_launch_are_removed_and_no_live_job_loses_its_own(tmp_path):
    ended = [_buffer(tmp_path, 31000, 0), _buffer(tmp_path, 31000, 1), _buffer(tmp_path, 31000, 2, addr="node-1")]
    other_launch = _buffer(tmp_path, 31001, 0)
    other_user = _buffer(tmp_path, 31000, 3, uid=os.getuid() + 1)
    live = _buffer(tmp_path, 31000, 4)  # a rank of a live job that reuses the port maps it
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time\n"
                               f"f = open({str(live)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0)\n"
                               "print('mapped', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert launch_buffers(31000, tmp_path) == sorted([*ended, live])
        assert remove_launch_buffers(31000, tmp_path) == sorted(ended)
    finally:
        holder.kill()
        holder.wait()
    assert not any(p.exists() for p in ended)
    assert other_launch.exists() and other_user.exists() and live.exists()
    # Once its job has ended, the next launch on that port takes its buffer too; this process's own mapping
    # does not count (an in-process run removes its buffer before it exits).
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 0):
        assert remove_launch_buffers(31000, tmp_path) == [live]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_two_rank_launch_leaves_no_buffer_in_dev_shm(tmp_path, token_data, monkeypatch):
    from ds_mtp import ranks, shm_buffers
    from ds_mtp.cli import main

    port = ranks.free_port()
    monkeypatch.setattr(ranks, "free_port", lambda: port)  # the launch's master port
    removed = []
    remove = shm_buffers.remove_launch_buffers
    monkeypatch.setattr(shm_buffers, "remove_launch_buffers", lambda p: removed.extend(remove(p)) or removed)
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--nproc", "2", f"data.path={token_data}",
                 "model.preset=tiny", "train.max_steps=1", "train.seq_len=32", "train.micro_batch=2",
                 "train.save_model=false"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert sorted(p.name.rsplit("_", 2)[1:] for p in removed) == [[str(port), "0"], [str(port), "1"]]
    assert launch_buffers(port) == []
