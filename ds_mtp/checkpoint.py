"""Training checkpoints that are complete before they become ``latest``, and the resume that trusts only those.

A save, on every rank of the trainers' world:

1. DeepSpeed writes the rank's model and optimizer files into ``checkpoints/stepN/`` without touching
   ``latest`` (``save_latest=False``: DeepSpeed would move it on rank 0 without waiting for the others);
2. the rank writes its RNG states, ``rng_rankR.pt`` (tensors and numbers only: loadable with
   ``weights_only=True``), and fsyncs every file it wrote;
3. barrier; rank 0 writes ``COMPLETE.json`` (the files of the tag and their sizes), then replaces ``latest``
   atomically (write, fsync, rename), fsyncs the folder; barrier.

A resume reads ``latest``; a tag whose ``COMPLETE.json`` is missing or whose files do not match it (a save killed
half-way, a damaged disk) is passed over for the newest complete one before it, and the run says so in one line.
``save_stage`` is called between the steps above: tests monkeypatch it to kill a save at each stage.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ds_mtp.data import write_atomic
from ds_mtp.errors import UserError
from ds_mtp.run_dir import LATEST_FILE, RunDir

COMPLETE_FILE = "COMPLETE.json"
"""In a tag folder: written last by rank 0, after every rank's files are on disk."""
RNG_FILE = "rng_rank{rank}.pt"
SAVE_STAGES = ("deepspeed_files", "rng_files", "complete_marker", "latest")


def save_stage(stage: str, tag_dir: Path) -> None:
    """Called after each stage of a save (SAVE_STAGES): a seam for the tests that kill a save part-way."""


def tag_of(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int | None:
    match = re.fullmatch(r"step(\d+)", tag)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# RNG states as tensors (weights_only-safe)

def rng_state() -> dict:
    """torch, numpy, Python (and CUDA) generator states as tensors and plain numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Saving

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, run_dir: RunDir, step: int, client_state: dict) -> Path:
    """Write checkpoint ``stepN`` on every rank and move ``latest`` to it once it is complete (a collective)."""
    import deepspeed.comm as dist

    rank = dist.get_rank()
    tag = tag_of(step)
    tag_dir = run_dir.checkpoints / tag
    before = {p.name for p in tag_dir.iterdir()} if tag_dir.is_dir() else set()
    engine.save_checkpoint(str(run_dir.checkpoints), tag=tag, client_state={**client_state, "step": step, "tag": tag},
                           save_latest=False)
    save_stage("deepspeed_files", tag_dir)
    rng_path = tag_dir / RNG_FILE.format(rank=rank)
    torch.save(rng_state(), rng_path)
    for path in tag_dir.iterdir():  # this rank's files (and, harmlessly, others' already written)
        if path.is_file() and (path.name not in before or path == rng_path):
            _fsync(path)
    save_stage("rng_files", tag_dir)
    dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE_FILE}
        marker = {"step": step, "world_size": dist.get_world_size(), "files": files}
        write_atomic(tag_dir / COMPLETE_FILE, (json.dumps(marker, indent=1) + "\n").encode())
        save_stage("complete_marker", tag_dir)
        write_atomic(run_dir.latest, tag.encode())
        _fsync(run_dir.checkpoints)
        save_stage("latest", tag_dir)
    dist.barrier()
    return tag_dir


# ----------------------------------------------------------------------------------------------
# Resuming

def incomplete_reason(tag_dir: Path) -> str | None:
    """Why a tag folder is not a complete checkpoint, or None when it is."""
    marker_path = tag_dir / COMPLETE_FILE
    if not tag_dir.is_dir():
        return "its folder is missing"
    if not marker_path.is_file():
        return f"it has no {COMPLETE_FILE} (its save did not finish)"
    try:
        marker = json.loads(marker_path.read_text())
        files = dict(marker["files"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"its {COMPLETE_FILE} is damaged"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} written"
    return None


def resume_tag(run_dir: RunDir) -> tuple[str, str | None]:
    """The tag to resume from: ``latest`` when it is complete, else the newest complete one before it.
    Returns (tag, a one-line note when ``latest`` was passed over). No complete checkpoint: one line."""
    ckpt = run_dir.checkpoints
    try:
        latest = run_dir.latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        latest = ""
    reason = incomplete_reason(ckpt / latest) if latest else f"{LATEST_FILE} is empty or unreadable"
    if reason is None:
        return latest, None
    newest = step_of(latest) if step_of(latest) is not None else float("inf")
    candidates = sorted((s, p.name) for p in ckpt.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None
                        and s < newest) if ckpt.is_dir() else []
    for _, tag in reversed(candidates):
        if incomplete_reason(ckpt / tag) is None:
            return tag, (f"checkpoint '{latest}' is incomplete ({reason}): resuming from '{tag}', the newest "
                         "complete one")
    raise UserError(f"--resume: no complete checkpoint in {ckpt} ('{latest or LATEST_FILE}': {reason})")


def load(engine, run_dir: RunDir, tag: str, resize=None) -> dict:
    """Load checkpoint ``tag`` into the engine, and this rank's RNG states; returns DeepSpeed's client state.

    ``resize`` (ds_mtp.universal.ResumePlan): the checkpoint was saved on another number of data-parallel ranks
    and loads from its universal conversion; a rank that had no counterpart then takes rank 0's RNG states."""
    import deepspeed.comm as dist

    from ds_mtp.universal import load_checkpoint

    load_path, client = load_checkpoint(engine, run_dir.checkpoints, resize, tag)
    if load_path is None:
        raise UserError(f"--resume: DeepSpeed could not load checkpoint {run_dir.checkpoints / tag}")
    rng_path = run_dir.checkpoints / tag / RNG_FILE.format(rank=dist.get_rank())
    if resize is not None and not rng_path.is_file():
        rng_path = run_dir.checkpoints / tag / RNG_FILE.format(rank=0)
    set_rng_state(torch.load(rng_path, weights_only=True))
    return client
