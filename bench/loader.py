"""Batches/s of the data loader: ds_mtp.data.WindowSampler (windows gathered vectorised from the memory
map) against building each batch in Python row by row, as the paper's code does.

    python bench/loader.py                        # the paper's set-up: batch 1024 × 32, document rows
    python bench/loader.py --batch 8 --seq-len 1024 --mode packed

The data is synthetic (documents of 5-30 tokens, as graph paths are) written once to a temporary
directory in the ds-mtp shard format; both loaders read the same memory-mapped shards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def python_rows(sampler, micro_index: int):
    """The same batch as sampler.batch(micro_index), one row at a time with Python lists."""
    import torch

    shards, T = sampler.shards, sampler.seq_len
    rows, docs = [], []
    for sample in sampler.sample_ids(micro_index).tolist():
        shard = int(np.searchsorted(sampler._first, sample, side="right") - 1)
        local = sample - int(sampler._first[shard])
        toks, offs = shards.tokens[shard], shards.offsets[shard]
        if sampler.mode == "packed":
            row = [int(t) for t in toks[local * T: (local + 1) * T]]
            doc = [int(np.searchsorted(offs, local * T + i, side="right") - 1) for i in range(T)]
        else:
            row = [int(t) for t in toks[offs[local]: min(offs[local + 1], offs[local] + T)]]
            row += [sampler.pad_id] * (T - len(row))
            doc = [local] * T
        rows.append(row)
        docs.append(doc)
    return torch.tensor(rows), torch.tensor(docs)


def batches_per_s(fn, seconds: float) -> float:
    fn(0)
    times, i = [], 1
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
        i += 1
    return 1.0 / statistics.median(times)


def main(argv=None) -> int:
    from ds_mtp.data import TokenShards, WindowSampler, write_documents

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--mode", choices=("document", "packed"), default="document")
    p.add_argument("--documents", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=5.0, help="time spent per loader")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, rng.integers(5, 30)) for _ in range(args.documents)]
    with tempfile.TemporaryDirectory() as tmp:
        write_documents(tmp, {"train": docs}, vocab_size=128, special_ids={"pad": 127, "eos": 126})
        sampler = WindowSampler(TokenShards(tmp, "train"), args.seq_len, args.batch, mode=args.mode)
        a, b = sampler.batch(3), python_rows(sampler, 3)
        assert (a.tokens == b[0]).all() and (a.doc_ids == b[1]).all(), "the two loaders disagree"
        fast = batches_per_s(sampler.batch, args.seconds)
        slow = batches_per_s(lambda i: python_rows(sampler, i), args.seconds)
    print(f"batch {args.batch} × {args.seq_len}, {args.mode} rows, {sum(map(len, docs)):,} tokens")
    print("| loader | batches/s | × |\n| --- | --- | --- |")
    print(f"| WindowSampler (vectorised) | {fast:,.1f} | {fast / slow:.1f} |")
    print(f"| Python row by row | {slow:,.1f} | 1.0 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
