"""Step time of LSE-MTP training with the latent targets from: the model itself (``self``), a checkpoint teacher
computed inside each trainer process, and the same teacher on separate teacher ranks (prefetching).

All three runs use the same student, data and trainer count, one after the other on this machine; the
figures that matter are the ratios to ``self`` (the issue's target: teacher ranks at most 1.1x, i.e. the
teacher's work hidden behind training). On a CPU-only machine the teacher ranks share the cores with the
trainers, so there the ratio measures contention as much as overlap; on GPUs each teacher has its own.

    python bench/teacher.py --out runs/bench_teacher [--trainers 2] [--steps 30] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_inputs(out: Path, preset: str, teacher_layers: int, seed: int) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from ds_mtp.config import PRESETS, ModelConfig
    from ds_mtp.data import has_manifest, write_documents
    from ds_mtp.model import MTPModel, save_exported

    data = out / "data"
    if not has_manifest(data):
        rng = np.random.default_rng(seed)
        docs = [np.concatenate([np.arange(s, s + rng.integers(5, 60)) % 250, [251]]) for s in rng.integers(0, 250, 4000)]
        write_documents(data, {"train": docs}, vocab_size=256, special_ids={"pad": 252, "eos": 251})
    teacher = out / "teacher"
    if not (teacher / "model.safetensors").is_file():
        torch.manual_seed(seed)
        cfg = ModelConfig(**{**PRESETS[preset], "vocab_size": 256, "n_layer": teacher_layers})
        model = MTPModel(cfg)
        save_exported(model, model.state_dict(), teacher)
    return data, teacher


def run(name: str, out: Path, nproc: int, overrides: list[str]) -> dict:
    run_dir = out / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "ds_mtp.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir), *overrides]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = rows[0]["tokens"]
    steady = rows[len(rows) // 5:]  # skip warm-up steps
    step_s = [tokens_per_step / r["tokens_per_s"] for r in steady]
    waits = [r.get("teacher_wait_s", 0.0) for r in steady]
    return {"name": name, "median_step_s": statistics.median(step_s), "mean_wait_s": statistics.mean(waits),
            "wall_s": wall, "last_latent": rows[-1].get("latent_2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_teacher")
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--teacher-layers", type=int, default=2, help="blocks of the (same-width) teacher")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, teacher = make_inputs(out, args.preset, args.teacher_layers, seed=0)
    common = [f"data.path={data}", f"model.preset={args.preset}", "model.mtp_k=3", f"train.seq_len={args.seq_len}",
              f"train.micro_batch={args.micro_batch}", f"train.max_steps={args.steps}", "train.save_model=false",
              "train.log_every=1000"]
    results = [
        run("self", out, args.trainers, common),
        run("in_process", out, args.trainers, [*common, f"teacher.source=checkpoint:{teacher}"]),
        run("teacher_ranks", out, args.trainers + 1,
            [*common, f"teacher.source=checkpoint:{teacher}", "teacher.ranks=1"]),
    ]
    base = results[0]["median_step_s"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: python bench/teacher.py --trainers {args.trainers} --steps {args.steps} --preset {args.preset} "
          f"--teacher-layers {args.teacher_layers} --seq-len {args.seq_len} --micro-batch {args.micro_batch}")
    print("| latent targets | ranks | median step (s) | x self | slowest rank's wait on its teacher per step (s) |")
    print("|---|---|---|---|---|")
    for r, ranks in zip(results, (args.trainers, args.trainers, f"{args.trainers}+1")):
        print(f"| {r['name']} | {ranks} | {r['median_step_s']:.4f} | {r['median_step_s'] / base:.2f} | "
              f"{r['mean_wait_s']:.4f} |")


if __name__ == "__main__":
    main()
