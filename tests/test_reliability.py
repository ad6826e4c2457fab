"""What a trusted trainer survives (docs/reliability.md): a save killed at each stage, SIGTERM to the launching
process or to one rank, a second writer, divergence, and the --resume mistakes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_mtp.errors import EXIT_PREEMPTED
from ds_mtp.monitor import read_metrics
from tests.conftest import REPO, kill_session, run_cli

COMMON = ["model.preset=tiny", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4", "train.zero_stage=1"]

# Train in this process with ds_mtp.checkpoint.save_stage replaced: the save of step KILL_STEP dies (as a SIGKILL
# would: no clean-up runs) right after STAGE.
KILL_DURING_SAVE = r"""
import os, sys
from ds_mtp import checkpoint
from ds_mtp.cli import main
stage, step = sys.argv[1], int(sys.argv[2])
def die_after(name, tag_dir):
    if name == stage and tag_dir.name == f"step{step}":
        os._exit(9)
checkpoint.save_stage = die_after
sys.exit(main(sys.argv[3:]))
"""


def _train_killed_during_save(run: Path, stage: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, stage, str(step), "train", "--run-dir", str(run),
                           *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"], r["ce_2"]) for r in read_metrics(run / "metrics.jsonl")]


def _save_args(token_data) -> list[str]:
    return [f"data.path={token_data}", *COMMON, "train.max_steps=6", "train.save_every=2", "train.save_model=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, token_data) -> Path:
    full = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli("train", "--run-dir", str(full), *_save_args(token_data)).returncode == 0
    return full


@pytest.mark.slow
@pytest.mark.parametrize("stage, resumes_from", [("deepspeed_files", 2), ("rng_files", 2), ("complete_marker", 2),
                                                 ("latest", 4)])
def test_a_save_killed_at_each_stage_resumes_exactly(tmp_path, token_data, uninterrupted, stage, resumes_from):
    args, full = _save_args(token_data), uninterrupted
    run = tmp_path / "run"
    killed = _train_killed_during_save(run, stage, 4, args)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text() == f"step{resumes_from}"
    resumed = run_cli("train", "--run-dir", str(run), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(run) == _losses(full)


@pytest.mark.slow
def test_an_incomplete_latest_falls_back_to_the_previous_checkpoint_in_one_line(tmp_path, token_data):
    args = [f"data.path={token_data}", *COMMON, "train.max_steps=4", "train.save_every=2"]
    run = tmp_path / "run"
    assert run_cli("train", "--run-dir", str(run), *args, "train.stop_after=4", "train.save_model=false"
                   ).returncode == 0
    (run / "checkpoints" / "step4" / "rng_rank0.pt").write_bytes(b"")  # a file cut short
    r = run_cli("train", "--run-dir", str(run), "--resume", *args, "train.max_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[ds-mtp] checkpoint 'step4' is incomplete (rng_rank0.pt has 0 bytes, not the" in r.stdout
    assert "resuming from 'step2', the newest complete one" in r.stdout
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    for tag in ("step2", "step4", "step5"):  # step4 was saved again by the resumed run
        (run / "checkpoints" / tag / "COMPLETE.json").unlink()
    (run / "checkpoints" / "latest").write_text("step5")
    r = run_cli("train", "--run-dir", str(run), "--resume", *args, "train.max_steps=6")
    assert r.returncode == 2 and r.stderr.startswith("error: --resume: no complete checkpoint in"), r.stderr


def _start(run: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "ds_mtp.cli", "train", "--run-dir", str(run), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)


def _wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run / "metrics.jsonl")) < steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc)
            out, err = proc.communicate()
            pytest.fail(f"the run ended or stalled before step {steps}: {err[-2000:]}")
        time.sleep(0.2)


def _rank_pids(parent: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(parent).children(recursive=True)
            if "ds_mtp.cli" in " ".join(p.cmdline()) and "--local_rank" in " ".join(p.cmdline())]


LONG = ["train.max_steps=100000", "train.save_model=false"]


def _stopped_by_sigterm(run: Path, args: list[str], target: str, extra: list[str]) -> int:
    """Start ``ds-mtp train ARGS``, SIGTERM ``target`` (the launching process or one rank) after a few steps;
    check it exits 75 with `latest` at the last logged step and no lock left. Returns that step."""
    proc = _start(run, [*args, *extra])
    try:
        before = len(read_metrics(run / "metrics.jsonl"))
        _wait_for_steps(run, proc, before + 3)
        if target == "parent":
            # a second writer while the run is live is refused, naming the holder
            second = run_cli("train", "--run-dir", str(run), "--resume", *args, *extra, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"is in use by pid {proc.pid} on " in second.stderr and second.stderr.count("\n") == 1
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.kill(_rank_pids(proc.pid)[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        kill_session(proc)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    last = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text() == f"step{last}"
    assert "continue with --resume" in err and not (run / "run.lock").exists()
    return last


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_rank_or_to_the_launch_saves_a_checkpoint_and_exits_75(tmp_path, token_data):
    run = tmp_path / "run"
    args = ["--nproc", "2", f"data.path={token_data}", *COMMON]
    _stopped_by_sigterm(run, args, "one rank", LONG)
    last = _stopped_by_sigterm(run, [*args, "--resume"], "parent", LONG)  # the resumed run, stopped in turn
    r = run_cli("train", "--run-dir", str(run), "--resume", *args, f"train.max_steps={last + 2}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == list(range(1, last + 3))


def test_a_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path, token_data, capsys):
    import socket

    from ds_mtp.errors import UserError
    from ds_mtp.run_dir import RunDir, RunLock

    run = RunDir(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.path.mkdir()
    run.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "1",
                                    "since": 0}))
    with RunLock(run):  # the holder is dead: taken over
        assert json.loads(run.lock.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()} since"):
            RunLock(run).acquire()
    assert not run.lock.exists()
    run.lock.write_text(json.dumps({"host": "another-node", "pid": 1, "since": 0}))
    with pytest.raises(UserError, match="in use by pid 1 on another-node .*on another host: if that process is gone"):
        RunLock(run).acquire()


@pytest.mark.slow
def test_divergence_stops_the_run_without_exporting(tmp_path, token_data):
    run = tmp_path / "run"
    r = run_cli("train", "--run-dir", str(run), f"data.path={token_data}", *COMMON, "train.max_steps=30",
                "train.lr=1e4", "train.max_bad_steps=3", "train.save_every=1000")
    assert r.returncode == 4, r.stderr[-3000:]
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: training diverged: 3 steps in a row up to step") and "no model is exported" in line
    assert not (run / "model").exists() and not (run / "checkpoints" / "latest").exists()
    for text in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))  # strict JSON


def test_metrics_rows_write_non_finite_values_as_null(tmp_path):
    from ds_mtp.monitor import Monitor

    monitor = Monitor(tmp_path)
    monitor.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    monitor.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3} and "NaN" not in line


@pytest.mark.slow
def test_resume_mistakes_are_one_line(tmp_path, token_data):
    run = tmp_path / "run"
    args = [f"data.path={token_data}", *COMMON, "train.max_steps=2"]
    assert run_cli("train", "--run-dir", str(run), *args).returncode == 0

    def resume(*extra):
        r = run_cli("train", "--run-dir", str(run), "--resume", *args, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        return r.stderr.strip()

    assert resume("train.seq_len=16").endswith(f"was trained with train.seq_len=32, not 16; a resumed run keeps them")
    assert "was trained with model.d_model=" in resume("model.d_model=48")
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config[:40])
    assert "config.json is damaged (not valid JSON" in resume()
    (run / "config.json").unlink()
    assert "has no config.json: not a ds-mtp run directory" in resume()
    (run / "config.json").write_text(config)
    (run / "checkpoints" / "latest").write_text("step99")  # names a checkpoint that is not there
    r = run_cli("train", "--run-dir", str(run), "--resume", *args)
    assert r.returncode == 0 and "checkpoint 'step99' is incomplete (its folder is missing): resuming from 'step2'" \
        in r.stdout, r.stderr[-2000:]


TEACHER_SIGNAL = r"""
import os, signal, sys, time
import torch.distributed as dist
from ds_mtp.teacher import STOP_KEY, forward_stop_signals
from ds_mtp.train import StopSignals
store = dist.HashStore()
with StopSignals():
    forward_stop_signals(store)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not store.check([STOP_KEY]) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(store.get(STOP_KEY).decode() if store.check([STOP_KEY]) else "no stop request")
"""


def test_a_teacher_rank_turns_sigterm_into_a_stop_request_for_its_trainers():
    r = subprocess.run([sys.executable, "-c", TEACHER_SIGNAL], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == "SIGTERM", r.stderr[-2000:]
