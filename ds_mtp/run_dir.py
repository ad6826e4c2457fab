"""A training run's directory: its file names, the new-run-or-resume rule, and the lock of the run in progress.

    RUN_DIR/config.json       the resolved run config (written once, before any rank starts)
    RUN_DIR/metrics.jsonl     one JSON object per optimizer step (ds_mtp.monitor)
    RUN_DIR/tensorboard/      TensorBoard event files
    RUN_DIR/checkpoints/      DeepSpeed checkpoints, one folder per tag (ds_mtp.checkpoint), and `latest`
    RUN_DIR/model/            the exported model after the last step (ds_mtp.model.save_exported)
    RUN_DIR/run.lock          host, pid and start time of the process that owns the run while it runs
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ds_mtp.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
"""In CHECKPOINT_DIR: the tag of the newest complete checkpoint (DeepSpeed's name, so its tools read it)."""
MODEL_DIR = "model"
LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def has_checkpoint(self) -> bool:
        return self.latest.is_file()

    def holds_run(self) -> bool:
        """Whether a run has already written here (a checkpoint, or metrics of steps)."""
        return self.has_checkpoint() or self.metrics.exists()


def resolve_model_dir(path: str | Path) -> Path:
    """An exported model directory (model.safetensors + config.json, ds_mtp.model.save_exported), or the one in
    a training run directory's model/."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() and (path / MODEL_DIR / "model.safetensors").is_file():
        return path / MODEL_DIR
    return path


def check_new_or_resume(run_dir: RunDir, resume: bool) -> None:
    """The one rule: a new run needs a directory that holds none; --resume needs a checkpoint."""
    if resume and not run_dir.has_checkpoint():
        raise UserError(f"--resume: no checkpoint in {run_dir.checkpoints}")
    if not resume and run_dir.holds_run():
        raise UserError(f"{run_dir.path} already holds a run: pass --resume to continue it, or choose another --run-dir")


def read_saved_config(run_dir: RunDir) -> dict:
    """RUN_DIR/config.json as a dict; a missing or damaged file is one line."""
    if not run_dir.config.is_file():
        raise UserError(f"{run_dir.path} has no {CONFIG_FILE}: not a ds-mtp run directory, or its config was removed")
    try:
        raw = json.loads(run_dir.config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{run_dir.config} is damaged (not valid JSON: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{run_dir.config} is damaged (not a JSON object)")
    return raw


# ----------------------------------------------------------------------------------------------
# The lock: one writer per run directory.

def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names one
    process even after the pid is reused. None when the process does not exist (or /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    """_process_start of the holder."""
    since: float

    def alive_here(self) -> bool | None:
        """True or False for a holder on this host; None for one on another host (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        start = _process_start(self.pid)
        return start is not None and (start == "" or self.started in ("", start))


class RunLock:
    """RUN_DIR/run.lock, created exclusively; held by the process that starts the ranks (or by the only rank).

    A lock whose holder is dead on this host is stale and taken over; a live holder, or one on another host,
    refuses the second writer in one line that names it."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock
        self.held = False
        self.made_dir = False
        """The lock created the run directory: a run that fails before writing anything leaves none behind."""

    def holder(self) -> LockHolder | None:
        try:
            raw = json.loads(self.path.read_text())
            return LockHolder(str(raw["host"]), int(raw["pid"]), str(raw.get("started", "")), float(raw.get("since", 0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return LockHolder("?", -1, "", 0.0)  # half-written by a writer killed mid-write: stale

    def acquire(self) -> RunLock:
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()) or "",
              "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                alive = holder.alive_here() if holder.pid > 0 else False
                if alive is False:
                    self.path.unlink(missing_ok=True)  # a stale lock from a dead process: take it over
                    continue
                where = "" if alive else " (on another host: if that process is gone, delete the lock file)"
                raise UserError(f"{self.path.parent} is in use by pid {holder.pid} on {holder.host} since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.since))}{where}; "
                                f"lock: {self.path}")
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise UserError(f"cannot take the lock {self.path} (another process keeps creating it)")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.pid == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_dir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
