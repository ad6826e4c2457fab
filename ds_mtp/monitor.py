"""Metrics sinks written by rank 0: RUN_DIR/metrics.jsonl (one JSON object per optimizer step) and
TensorBoard event files under RUN_DIR/tensorboard."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ds_mtp.data import write_atomic


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run: the rows before it are intact
    return rows


class Monitor:
    """Appends per-step scalars to metrics.jsonl and TensorBoard. Resuming at step S drops rows after S,
    which the resumed run writes again."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                group = "loss" if key == "loss" or key.split("_")[0] in ("ce", "latent", "semantic", "acc") else "train"
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.writer.close()
