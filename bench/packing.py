"""Document-masked packing against one padded document per row, and the attention mask's cost.

    python bench/packing.py                      # USG world, paper-graph preset, 1 and 2 ranks (~6 min on 2 cores)
    python bench/packing.py --text runs/prep/data --text-preset small --text-seq-len 256

Part 1 (a graph world): ``ds-mtp train`` with data.sampling=document (one path per padded row) and with
data.sampling=packed_documents (whole paths packed into windows of the same length, attention and
positions inside each path), through the DeepSpeed engine (ZeRO-3) on each ``--nproc``. Reports window
positions/s (the engine's tokens_per_s), the share of pad positions in the very micro-batches the runs
trained on (recomputed from the same samplers), and non-pad tokens/s = positions/s × (1 − pad share).

Part 2 (``--text DIR``, a text corpus from ``ds-mtp prep shard``): step time of data.sampling=packed with
model.attention=document (the block-diagonal mask) against model.attention=window (plain causal).

Runs of the compared settings alternate (A B A B ...) so that load from other processes falls on both;
each figure is the median over the steps after ``--warmup`` and over trials. Compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_steps(run_dir: Path, overrides: list[str], nproc: int) -> list[dict]:
    """One `ds-mtp train` run; its metrics rows."""
    from ds_mtp.monitor import read_metrics

    cmd = [sys.executable, "-m", "ds_mtp.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir),
           *overrides, "train.save_model=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return read_metrics(run_dir / "metrics.jsonl")


def pad_share(data: Path, sampling: str, seq_len: int, micro: int, nproc: int, steps: int, seed: int) -> float:
    """Share of pad positions over every micro-batch of every rank in the first ``steps`` steps."""
    from ds_mtp.data import TokenShards, WindowSampler, read_meta

    pad = read_meta(data).special_ids.get("pad")
    shards = TokenShards(data)
    pads = total = 0
    for rank in range(nproc):
        sampler = WindowSampler(shards, seq_len, micro, seed=seed, dp_rank=rank, dp_size=nproc, mode=sampling)
        for step in range(steps):
            tokens = sampler.batch(step).tokens
            pads += int((tokens == pad).sum()) if pad is not None else 0
            total += tokens.numel()
    return pads / total


def median_after(rows: list[dict], key: str, warmup: int) -> list[float]:
    return [r[key] for r in rows[warmup:]]


def world_part(args, out: Path) -> list[dict]:
    from ds_mtp.experiments.worlds import make_world

    world = args.world
    if world is None:
        world = out / "usg"
        make_world("usg", "paper", world, seed=0)
    results = []
    for nproc in args.nproc:
        micro = args.global_batch // nproc
        rates: dict[str, list[float]] = {"document": [], "packed_documents": []}
        for trial in range(args.trials):
            for sampling in rates:
                overrides = [f"data.path={world}", f"data.sampling={sampling}", "model.preset=paper-graph",
                             "model.mtp_k=4", f"train.seq_len={args.seq_len}", f"train.micro_batch={micro}",
                             f"train.max_steps={args.steps}", "train.log_every=1000", "train.seed=0"]
                rows = train_steps(out / f"w{nproc}-{sampling}-{trial}", overrides, nproc)
                rates[sampling] += median_after(rows, "tokens_per_s", args.warmup)
        for sampling, values in rates.items():
            share = pad_share(world, sampling, args.seq_len, micro, nproc, args.steps, seed=0)
            positions = statistics.median(values)
            results.append(dict(part="world", nproc=nproc, setting=sampling, positions_per_s=positions,
                                pad_share=share, real_tokens_per_s=positions * (1 - share)))
    return results


def text_part(args, out: Path) -> list[dict]:
    times: dict[str, list[float]] = {"window": [], "document": []}
    for trial in range(args.trials):
        for attention in times:
            overrides = [f"data.path={args.text}", "data.sampling=packed", f"model.preset={args.text_preset}",
                         f"model.attention={attention}", f"train.seq_len={args.text_seq_len}",
                         f"model.max_seq_len={args.text_seq_len}",
                         f"train.micro_batch={args.text_micro_batch}", f"train.max_steps={args.text_steps}",
                         "train.log_every=1000", "train.seed=0"]
            rows = train_steps(out / f"t-{attention}-{trial}", overrides, 1)
            tokens_per_step = args.text_micro_batch * args.text_seq_len
            times[attention] += [tokens_per_step / r for r in median_after(rows, "tokens_per_s", args.warmup)]
    from ds_mtp.data import TokenShards

    shards = TokenShards(args.text)
    docs_per_window = shards.num_documents / (shards.num_tokens / args.text_seq_len)
    return [dict(part="text", nproc=1, setting=attention, ms_per_step=1e3 * statistics.median(values),
                 documents_per_window=docs_per_window) for attention, values in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=Path, help="a world directory (default: make the paper's USG world)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=24, help="window length for both samplings (USG paths <= 21)")
    p.add_argument("--global-batch", type=int, default=64, help="windows per step over all ranks")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--text", type=Path, help="a text data directory (ds-mtp prep shard) for the mask's cost")
    p.add_argument("--text-preset", default="small")
    p.add_argument("--text-seq-len", type=int, default=256)
    p.add_argument("--text-micro-batch", type=int, default=4)
    p.add_argument("--text-steps", type=int, default=15)
    p.add_argument("--skip-world", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        out = Path(tmp)
        rows = [] if args.skip_world else world_part(args, out)
        if args.text:
            rows += text_part(args, out)
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    world_rows = [r for r in rows if r["part"] == "world"]
    if world_rows:
        print("\n| ranks | sampling | positions/s | pad share | non-pad tokens/s | × document |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in world_rows:
            base = next(b for b in world_rows if b["nproc"] == r["nproc"] and b["setting"] == "document")
            print(f"| {r['nproc']} | {r['setting']} | {r['positions_per_s']:,.0f} | {r['pad_share']:.3f} | "
                  f"{r['real_tokens_per_s']:,.0f} | {r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f} |")
    text_rows = [r for r in rows if r["part"] == "text"]
    if text_rows:
        base = text_rows[0]
        print(f"\ntext corpus, {base['documents_per_window']:.1f} documents per window on average")
        print("| attention | ms/step | × window |")
        print("| --- | --- | --- |")
        for r in text_rows:
            print(f"| {r['setting']} | {r['ms_per_step']:.1f} | {r['ms_per_step'] / base['ms_per_step']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
