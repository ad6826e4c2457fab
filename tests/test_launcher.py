import json
import os
import shlex
import socket
import sys
from pathlib import Path

import pytest

from ds_mtp.cli import main
from ds_mtp.config import load_config
from ds_mtp.ranks import free_port
from ds_mtp.errors import UserError
from ds_mtp.monitor import read_metrics
from launcher.checks import find_executable
from launcher.hostfile import parse_hostfile_text, select_slots
from tests.conftest import REPO, run_cli

TINY = ["model.preset=tiny", "model.mtp_k=2", "train.seq_len=32", "train.micro_batch=4"]


PIPELINE = ("train.pipeline_stages=2", "train.zero_stage=1")
TEACHER = ("teacher.ranks=1", "teacher.source=checkpoint:/teacher/model")


def dry_run(capsys, *args: str) -> tuple[str, list[str]]:
    """Run `ds-mtp launch --dry-run ARGS`; return the summary line and the command as argv."""
    code = main(["launch", "--dry-run", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary, command = out.strip().splitlines()
    return summary, shlex.split(command)


def one_line_error(capsys, *args: str) -> str:
    code = main(["launch", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- hostfiles and filters ------------------------------------------------------------------------


def test_hostfile_comments_blank_lines_and_order():
    text = "# cluster\nnode-b slots=4   # the big one\n\nnode-a slots=2\n"
    assert list(parse_hostfile_text(text).items()) == [("node-b", 4), ("node-a", 2)]


@pytest.mark.parametrize("text, message", [
    ("node-a slots=2\nnode-b 4\n", "line 2: expected 'HOST slots=N', got 'node-b 4'"),
    ("node-a slots=0\n", "line 1: slots must be a positive integer, got '0'"),
    ("node-a slots=two\n", "slots must be a positive integer, got 'two'"),
    ("node-a slots=2\nnode-a slots=2\n", "line 2: host 'node-a' is listed twice (first on line 1)"),
    ("# nothing here\n\n", "lists no hosts"),
])
def test_malformed_hostfile_exits_2_with_one_line(tmp_path, token_data, capsys, text, message):
    hostfile = write(tmp_path / "hostfile", text)
    err = one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--hostfile", hostfile, "--dry-run",
                         f"data.path={token_data}", *TINY)
    assert message in err and hostfile in err
    assert not (tmp_path / "run").exists()


def test_missing_hostfile_is_an_error_not_a_local_run(tmp_path, token_data, capsys):
    err = one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--hostfile", str(tmp_path / "nope"),
                         f"data.path={token_data}", *TINY)
    assert "hostfile not found" in err


def test_include_exclude_and_per_node_caps():
    hosts = {"a": 4, "b": 4, "c": 2}
    assert select_slots(hosts, include="a:0,2@c") == {"a": [0, 2], "c": [0, 1]}
    assert select_slots(hosts, exclude="b@a:3") == {"a": [0, 1, 2], "c": [0, 1]}
    assert select_slots(hosts, num_nodes=2, slots_per_node=3) == {"a": [0, 1, 2], "b": [0, 1, 2]}
    for kwargs, message in [(dict(include="d"), "host 'd' is not in the hostfile"),
                            (dict(include="a:4"), "'4' is not a slot of a (0..3)"),
                            (dict(include="a", exclude="b"), "cannot be combined"),
                            (dict(include="a", num_nodes=1), "cannot be combined"),
                            (dict(num_nodes=4), "has only 3 node(s)"),
                            (dict(slots_per_node=3), "c has only 2 slot(s)"),
                            (dict(exclude="a@b@c"), "leaves no slot")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            select_slots(hosts, **kwargs)


# --- composed commands ----------------------------------------------------------------------------


def test_single_node_dry_run_prints_the_command_and_writes_nothing(tmp_path, token_data, capsys):
    run = tmp_path / "run"
    summary, cmd = dry_run(capsys, "--run-dir", str(run), "--nproc", "2", "--master-port", str(free_port()),
                           f"data.path={token_data}", *TINY, "train.grad_accum=3")
    assert "2 rank(s) on this node = 2 trainer(s) [1 pipeline stage(s) x 2 data-parallel]" in summary
    assert "24 windows of 32 tokens per step" in summary
    assert Path(cmd[2]).name == "deepspeed" and cmd[:2] == ["PYTHONUNBUFFERED=1", "DS_MTP_PREPARED=1"]
    i = cmd.index("--module")
    assert cmd[3:i] == ["--num_gpus", "2", "--master_port", cmd[6]]
    assert cmd[i + 1:] == ["ds_mtp.cli", "train", "--run-dir", str(run.resolve()), f"data.path={token_data}", *TINY,
                           "train.grad_accum=3"]
    assert not run.exists()


def test_multi_node_pdsh_no_ssh_and_back_end_commands(tmp_path, token_data, capsys):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=2\n")
    config = write(tmp_path / "run.yaml", f"data:\n  path: {token_data}\nmodel:\n  preset: tiny\n")
    common = ["--run-dir", str(tmp_path / "run"), "--config", config, "--hostfile", hostfile]
    summary, cmd = dry_run(capsys, *common, "--master-addr", "10.1.2.3", "--include", "node-a@node-b:1")
    assert "3 rank(s) on 2 node(s) (node-a:2, node-b:1)" in summary
    i = cmd.index("--module")
    assert cmd[3:i] == ["--hostfile", hostfile, "--include", "node-a@node-b:1", "--master_addr", "10.1.2.3",
                        "--master_port", "29500"]
    assert cmd[i + 1:] == ["ds_mtp.cli", "train", "--run-dir", str((tmp_path / "run").resolve()), "--config", config]

    summary, cmd = dry_run(capsys, *common, "--no-ssh", "--node-rank", "1", "--master-addr", "10.1.2.3")
    assert "node rank 1: 4 rank(s)" in summary
    assert cmd[0] == "PYTHONUNBUFFERED=1" and "DS_MTP_PREPARED=1" not in cmd  # node 1 leaves RUN_DIR to node 0
    assert cmd[cmd.index("--no_ssh"):cmd.index("--module")] == ["--no_ssh", "--node_rank", "1"]

    _, cmd = dry_run(capsys, *common, "--launcher", "openmpi", "--launcher-args=--mca btl tcp", "--nproc", "1")
    i = cmd.index("--module")
    assert cmd[3:i] == ["--hostfile", hostfile, "--num_gpus", "1", "--master_port", "29500", "--launcher", "openmpi",
                        "--launcher_args", "--mca btl tcp"]

    # DeepSpeed's slurm runner starts a file, and srun tasks learn the rendezvous from the exported environment.
    _, cmd = dry_run(capsys, *common, "--launcher", "slurm", "--launcher-args=--mem=0")
    assert cmd[:4] == ["PYTHONUNBUFFERED=1", "DS_MTP_PREPARED=1", "DS_MTP_SLURM=1", "MASTER_ADDR=node-a"]
    assert cmd[4] == "MASTER_PORT=29500"
    i = cmd.index(str(REPO / "launcher" / "rank.py"))
    assert cmd[6:i] == ["--hostfile", hostfile, "--master_addr", "node-a", "--master_port", "29500", "--launcher",
                        "slurm", "--no_ssh_check", "--launcher_args", "--mem=0"]
    assert cmd[i + 1:i + 3] == ["train", "--run-dir"]


def test_single_gpu_node_keeps_cuda_visible_devices(tmp_path, token_data, capsys, monkeypatch):
    """DeepSpeed forgets CUDA_VISIBLE_DEVICES once --num_gpus is given: the launch names the visible GPUs."""
    import launcher.checks

    monkeypatch.setattr(launcher.checks, "local_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    _, cmd = dry_run(capsys, "--run-dir", str(tmp_path / "run"), "--nproc", "2", f"data.path={token_data}", *TINY)
    assert cmd[3:5] == ["--include", "localhost:2,3"] and "--num_gpus" not in cmd
    assert one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--nproc", "5", f"data.path={token_data}",
                          *TINY).strip() == "error: --nproc 5: this node has 4 GPU(s)"


@pytest.mark.skipif(find_executable("mpirun") is None, reason="no mpirun (pip install mpich)")
def test_mpirun_dry_run_passes_the_port_to_every_rank(tmp_path, token_data, capsys):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=1\n")
    _, cmd = dry_run(capsys, "--launcher", "mpirun", "--run-dir", str(tmp_path / "run"), "--hostfile", hostfile,
                     "--master-port", "29600", f"data.path={token_data}", *TINY)
    mpirun = cmd.index(find_executable("mpirun"))
    assert cmd[mpirun + 1:mpirun + 3] == ["-n", "3"]
    hosts = cmd[mpirun + 3:mpirun + 5]
    assert hosts in (["-hosts", "node-a:2,node-b:1"], ["--host", "node-a:2,node-b:1"])
    tail = cmd[mpirun + 5:]
    assert ("-genv" in tail and tail[tail.index("-genv") + 1:tail.index("-genv") + 3] == ["MASTER_PORT", "29600"]) or \
        "MASTER_PORT=29600" in tail
    assert tail[tail.index(sys.executable):][:4] == [sys.executable, "-u", "-m", "ds_mtp.cli"]


def test_two_nodes_two_stages_dry_run(tmp_path, token_data, capsys):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=2\n")
    summary, cmd = dry_run(capsys, "--run-dir", str(tmp_path / "run"), "--hostfile", hostfile, "--master-addr",
                           "10.0.0.1", f"data.path={token_data}", *TINY, *PIPELINE)
    assert ("4 rank(s) on 2 node(s) (node-a:2, node-b:2) = 4 trainer(s) [2 pipeline stage(s) x 2 data-parallel]; "
            "8 windows of 32 tokens per step") in summary
    assert cmd[cmd.index("--hostfile") + 1] == hostfile and "train.pipeline_stages=2" in cmd


def test_teacher_ranks_are_set_aside_dry_run(tmp_path, token_data, capsys):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=1\n")
    summary, cmd = dry_run(capsys, "--run-dir", str(tmp_path / "run"), "--hostfile", hostfile, "--master-addr",
                           "10.0.0.1", f"data.path={token_data}", *TINY, *TEACHER)
    assert ("3 rank(s) on 2 node(s) (node-a:2, node-b:1) = 2 trainer(s) [1 pipeline stage(s) x 2 data-parallel] "
            "+ 1 teacher rank(s); 8 windows of 32 tokens per step") in summary
    assert "teacher.ranks=1" in cmd


def test_indivisible_world_size_exits_2_with_one_line(tmp_path, token_data, capsys):
    hostfile = write(tmp_path / "hostfile", "node-a slots=2\nnode-b slots=1\n")
    err = one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--hostfile", hostfile, "--dry-run",
                         f"data.path={token_data}", *TINY, *PIPELINE)
    assert "train.pipeline_stages=2 needs a multiple of 2 trainer ranks, got 3" in err


# --- pre-flight checks ----------------------------------------------------------------------------


def test_busy_master_port_is_refused(tmp_path, token_data, capsys):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--master-port", str(port), "--dry-run",
                             f"data.path={token_data}", *TINY)
    assert f"--master-port {port} is already in use" in err


@pytest.mark.parametrize("ds_config, overrides, message", [
    ({"train_batch_size": 64}, [], "train_batch_size=64 contradicts the run config (train_batch_size=8 from "
                                   "micro_batch=4, grad_accum=1, data-parallel size=2)"),
    ({"zero_optimization": {"stage": 3}}, ["train.zero_stage=1"], "zero_optimization.stage=3 contradicts "
                                                                   "train.zero_stage=1"),
    ({"bf16": {"enabled": True}}, ["train.precision=fp32"], "bf16.enabled=true contradicts train.precision=fp32"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["train.zero_stage=2"],
     "offload_param needs ZeRO-3"),
])
def test_contradicting_ds_config_exits_2(tmp_path, token_data, capsys, ds_config, overrides, message):
    path = write(tmp_path / "ds.json", json.dumps(ds_config))
    err = one_line_error(capsys, "--run-dir", str(tmp_path / "run"), "--nproc", "2", "--dry-run",
                         f"data.path={token_data}", *TINY, f"train.ds_config={path}", *overrides)
    assert message in err


def test_missing_config_and_flag_misuse(tmp_path, token_data, capsys):
    run = ["--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert "config file not found" in one_line_error(capsys, *run, "--config", str(tmp_path / "none.yaml"))
    assert "DeepSpeed config not found" in one_line_error(capsys, *run, f"data.path={token_data}",
                                                          "train.ds_config=/none/ds.json")
    assert "--no-ssh needs --hostfile" in one_line_error(capsys, *run, "--no-ssh", f"data.path={token_data}")
    assert "--node-rank applies only with --no-ssh" in one_line_error(capsys, *run, "--node-rank", "1")
    assert "unknown launcher 'torchrun'" in one_line_error(capsys, *run, "--launcher", "torchrun")
    hostfile = write(tmp_path / "hostfile", "a slots=1\nb slots=1\n")
    assert "--node-rank 2: the hostfile has 2 node(s)" in one_line_error(
        capsys, *run, "--hostfile", hostfile, "--no-ssh", "--node-rank", "2", "--master-addr", "127.0.0.1",
        f"data.path={token_data}", *TINY)


def test_rank_script_runs_the_cli_from_any_directory(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, str(REPO / "launcher" / "rank.py"), "train", "--run-dir", str(tmp_path / "r"),
                        "model.preset=tiny"], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "PYTHONPATH")})
    assert r.returncode == 2 and r.stderr.startswith("error: no training data"), r.stderr


def test_python_dash_m_launcher_is_ds_mtp_launch(tmp_path, token_data):
    r = run_cli("launch", "--run-dir", str(tmp_path / "run"), "--dry-run", "--nproc", "3", f"data.path={token_data}",
                *TINY)
    import subprocess

    r2 = subprocess.run([sys.executable, "-m", "launcher", "--run-dir", str(tmp_path / "run"), "--dry-run", "--nproc",
                         "3", f"data.path={token_data}", *TINY], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == r2.returncode == 0, r.stderr + r2.stderr
    assert r.stdout.splitlines()[0] == r2.stdout.splitlines()[0]
    assert "3 rank(s) on this node" in r2.stdout


# --- real launches --------------------------------------------------------------------------------

RUN = [*TINY, "train.max_steps=3", "train.save_model=false"]


def _assert_trained_3_steps_on_2_ranks(run: Path) -> list[dict]:
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["tokens"] == 3 * 2 * 4 * 32  # two data-parallel ranks
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step3"
    assert all(0 <= r[f"acc_{k}"] <= 1 for r in rows for k in (1, 2)) and rows[-1]["peak_mem_gib"] > 0.1
    return rows


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("teachers", [0, 1])
def test_two_nodes_without_ssh_train_3_steps_together(tmp_path, token_data, teacher_dir, teachers):
    """Two "nodes" on localhost, one rank each; with a teacher, node 1 holds a trainer and the teacher."""
    import subprocess

    from tests.conftest import kill_session

    hostfile = write(tmp_path / "hostfile", f"node0 slots=1\nnode1 slots={1 + teachers}\n")
    run = tmp_path / "run"
    teacher = [f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1"] if teachers else []
    args = ["--run-dir", str(run), "--hostfile", hostfile, "--no-ssh", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), f"data.path={token_data}", *RUN, *teacher]
    env_cmd = [sys.executable, "-m", "ds_mtp.cli", "launch"]
    node0 = subprocess.Popen([*env_cmd, "--node-rank", "0", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        node1 = run_cli("launch", "--node-rank", "1", *args, env={"OMP_NUM_THREADS": "1"})
        out0, _ = node0.communicate(timeout=300)
    finally:
        kill_session(node0)
    assert node0.returncode == 0 and node1.returncode == 0, out0[-3000:] + node1.stdout[-3000:] + node1.stderr[-2000:]
    assert "ZeRO-3, 2 rank(s)" in out0  # rank 0 runs on node 0 and sees both nodes' trainers
    rows = _assert_trained_3_steps_on_2_ranks(run)
    if teachers:
        assert "served 6 micro-batches" in node1.stdout + node1.stderr and all("teacher_wait_s" in r for r in rows)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(find_executable("mpirun") is None, reason="no mpirun (pip install mpich)")
@pytest.mark.parametrize("teachers", [0, 1])
def test_mpirun_two_ranks_train_3_steps(tmp_path, token_data, teacher_dir, teachers):
    """Two trainers under mpirun; with a teacher, a third rank serves their latent targets."""
    run = tmp_path / "run"
    teacher = [f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1"] if teachers else []
    r = run_cli("launch", "--launcher", "mpirun", "--nproc", str(2 + teachers), "--master-port", str(free_port()),
                "--run-dir", str(run), f"data.path={token_data}", *RUN, *teacher, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"mpirun -n {2 + teachers}" in r.stdout and "ZeRO-3, 2 rank(s)" in r.stdout
    rows = _assert_trained_3_steps_on_2_ranks(run)
    if teachers:
        assert "served 6 micro-batches" in r.stdout + r.stderr and all("teacher_wait_s" in row for row in rows)


# --- ds_configs/ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_each_shipped_ds_config_is_documented_and_builds(path):
    from ds_mtp.config import RunConfig
    from ds_mtp.engine import build_ds_config

    assert f"`{path.name}`" in (REPO / "ds_configs" / "README.md").read_text()
    raw = json.loads(path.read_text())
    cfg = RunConfig()
    cfg.train.ds_config, cfg.train.zero_stage, cfg.train.grad_accum = str(path), raw["zero_optimization"]["stage"], 2
    ds = build_ds_config(cfg, dp_size=3, gpu=False)
    assert ds["train_batch_size"] == cfg.train.micro_batch * 2 * 3
    assert ds["bf16"]["enabled"] == raw.get("bf16", {}).get("enabled", False)  # CPU: bf16 only where the file says
    assert "optimizer" not in ds and "scheduler" not in ds


def test_signals_go_to_the_ranks_not_to_the_launchers_around_them():
    from launcher.run import is_rank_command

    assert is_rank_command(["/v/bin/python", "-u", "-m", "ds_mtp.cli", "train", "--local_rank=1"])
    assert is_rank_command(["python3", "/repo/launcher/rank.py", "train"])
    assert not is_rank_command(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--module", "ds_mtp.cli"])
    assert not is_rank_command(["/v/bin/python", "-m", "deepspeed.launcher.runner", "--module", "ds_mtp.cli"])
    assert not is_rank_command(["/usr/bin/mpirun", "-n", "2", "python", "-u", "-m", "ds_mtp.cli", "train"])
