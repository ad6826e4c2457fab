"""Pipeline step time and bubble fraction against the ideal (P-1)/(M+P-1), for M micro-batches.

    python bench/pipeline.py [--stages 2] [--micro-batches 1 4 8] [--steps 6] [--preset small]

Starts P ranks through the deepspeed launcher (CPU processes with gloo, or GPUs), builds the
ds_mtp.pipeline engine once per M (M = gradient-accumulation steps) and times optimizer steps on
random tokens. Each rank also times its own forward and backward instructions; its bubble is the
rest of the step (waiting on the neighbouring stages, including the point-to-point transfers):

    bubble(rank) = 1 - busy(rank) / step_time        measured bubble = mean over the P stages

Rank 0 prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=6, help="timed steps per M (after 2 warm-up steps)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed_instructions(engine, busy: list):
    """Time the forward and backward instructions of this rank's schedule (instance-level wrapper)."""
    from deepspeed.runtime.pipe import schedule

    def timed(fn):
        def run(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                busy[0] += time.perf_counter() - started
        return run

    table = dict(type(engine)._INSTRUCTION_MAP)
    for instr in (schedule.ForwardPass, schedule.BackwardPass):
        table[instr] = timed(table[instr])
    engine._INSTRUCTION_MAP = table


def bench_rank(args) -> None:
    import torch
    import deepspeed.comm as dist

    from ds_mtp.config import load_config
    from ds_mtp.engine import init_distributed
    from ds_mtp.pipeline import build_pipeline_engine
    from ds_mtp.train import _quiet_libraries, set_cpu_threads

    _quiet_libraries()
    set_cpu_threads()
    init_distributed()
    rank, P = dist.get_rank(), args.stages
    results = []
    for M in args.micro_batches:
        cfg = load_config(None, [f"model.preset={args.preset}", f"model.n_layer={args.n_layer}",
                                 f"model.vocab_size={args.vocab}", "model.mtp_k=2", f"train.seq_len={args.seq_len}",
                                 f"model.max_seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}",
                                 f"train.grad_accum={M}", f"train.pipeline_stages={P}", "train.max_steps=1000"])
        engine, _, _ = build_pipeline_engine(cfg, pad_id=None)
        busy = [0.0]
        timed_instructions(engine, busy)
        gen = torch.Generator().manual_seed(0)

        def batches():
            while True:
                tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=gen).to(engine.device)
                yield tokens, (tokens, torch.zeros_like(tokens))

        data = batches()
        step_times, bubbles = [], []
        for step in range(2 + args.steps):
            dist.barrier()
            busy[0] = 0.0
            started = time.perf_counter()
            engine.train_batch(data_iter=data)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            if step >= 2:
                step_times.append(elapsed)
                bubbles.append(1 - busy[0] / elapsed)
        stats = torch.tensor([statistics.median(step_times), statistics.mean(bubbles)], dtype=torch.float64,
                             device=engine.device)
        gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stats)
        if rank == 0:
            step_time = max(float(g[0]) for g in gathered)  # the step ends when the slowest rank's does
            bubble = statistics.mean(float(g[1]) for g in gathered)
            results.append({"stages": P, "micro_batches": M, "step_s": round(step_time, 4),
                            "s_per_micro_batch": round(step_time / M, 4), "bubble": round(bubble, 3),
                            "ideal_bubble": round((P - 1) / (M + P - 1), 3)})
        del engine
    if rank == 0:
        print("| P | M | step (s) | s / micro-batch | bubble measured | ideal (P-1)/(M+P-1) |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['stages']} | {r['micro_batches']} | {r['step_s']:.3f} | {r['s_per_micro_batch']:.3f} | "
                  f"{r['bubble']:.2f} | {r['ideal_bubble']:.2f} |")
        print(json.dumps({"pipeline_bench": results, "args": {k: v for k, v in vars(args).items() if k != "local_rank"}}))


def main() -> int:
    args = parse_args()
    if "LOCAL_RANK" in os.environ:
        bench_rank(args)
        return 0
    from ds_mtp.ranks import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.stages),
           "--master_port", str(free_port()), __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


if __name__ == "__main__":
    sys.exit(main())
