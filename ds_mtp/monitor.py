"""Metrics sinks written by rank 0: RUN_DIR/metrics.jsonl (one JSON object per optimizer step; non-finite values
as null) and
TensorBoard event files under RUN_DIR/tensorboard. Rows of steps with a held-out evaluation
(train.eval_every, ds_mtp.validation) also carry eval_ce_k / eval_acc_k, tagged eval/ce_k, eval/acc_k."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ds_mtp.data import write_atomic
from ds_mtp.run_dir import RunDir


def json_row(row: dict) -> str:
    """One metrics.jsonl line. A non-finite value (a diverged step's loss) is written as null: JSON has no
    NaN or Infinity, and the readers of metrics.jsonl (jq, pandas, other languages) refuse them."""
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()},
                      allow_nan=False)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the usual MFU convention: 6 x the weights of every
    matmul the token goes through (the unembedding once per head) + 12 x d x T per attention layer.
    Norms, activations, the latent/semantic distances and the causal mask's saving are not counted."""
    import torch.nn as nn

    from ds_mtp.model import CausalSelfAttention

    cfg = model.cfg
    unembed = getattr(model.heads, "unembed", None)
    linear = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not unembed)
    attention_layers = sum(isinstance(m, CausalSelfAttention) for m in model.modules())
    return 6.0 * (linear + cfg.mtp_k * cfg.vocab_size * cfg.d_model) + 12.0 * attention_layers * cfg.d_model * seq_len


def peak_memory_gib() -> float:
    """This process's peak: allocated accelerator memory on GPU, resident set size on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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


PERF_KEYS = ("tokens_per_s", "peak_mem_gib", "tflops_per_gpu", "mfu")


class Monitor:
    """Appends per-step scalars to metrics.jsonl and TensorBoard. Resuming at step S drops rows after S,
    which the resumed run writes again."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        paths = RunDir(run_dir)
        self.path = paths.metrics
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        write_atomic(self.path, "".join(json_row(r) + "\n" for r in kept).encode())
        self._file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(paths.tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json_row(row) + "\n")
        self._file.flush()
        step = row["step"]
        for key, value in row.items():
            if key.startswith("eval_") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{key[len('eval_'):]}", value, step)  # eval/ce_1, eval/acc_1
            elif key != "step" and isinstance(value, (int, float)):
                prefix = key.split("_")[0]
                group = "loss" if key == "loss" or prefix in ("ce", "latent", "semantic") else \
                    "accuracy" if prefix == "acc" else "perf" if key in PERF_KEYS else "train"
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.writer.close()
