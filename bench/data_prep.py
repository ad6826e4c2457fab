"""Throughput of ``data_prep shard`` against the ceiling of plain SentencePiece encoding.

For W in --workers: tokens/s of the whole pipeline (read .jsonl, parse, validate, hash, tokenize,
split, write shards, checkpoints, manifest) with W worker processes, and the ceiling: plain
``SentencePieceProcessor.encode`` of the same documents, already in memory, in W processes with no
I/O. Reports pipeline/ceiling per W and the 1 -> 2 worker speed-up, all ratios from one run (the
machine may be shared, so absolute numbers are noisy). The corpus is the standard library's
docstrings, repeated --repeat times.

    python bench/data_prep.py --repeat 8 --vocab-size 8000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.shard import shard_corpus  # noqa: E402
from data_prep.stdlib_corpus import iter_docstrings  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402

_docs: list[str] = []
_model = ""


def _encode_chunk(bounds):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(_model)
    start, cpu = time.perf_counter(), time.process_time()  # perf_counter: CLOCK_MONOTONIC, shared by processes
    n = sum(len(ids) for ids in sp.encode(_docs[bounds[0]:bounds[1]], num_threads=1))
    return start, time.perf_counter(), n, time.process_time() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ceiling(workers: int) -> tuple[float, float]:
    """Plain encode of all documents in ``workers`` processes (encode time only): tokens per wall second
    and per CPU second."""
    step = -(-len(_docs) // workers)
    chunks = [(i, min(i + step, len(_docs))) for i in range(0, len(_docs), step)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_encode_chunk, chunks, chunksize=1)
    tokens = sum(r[2] for r in results) + len(_docs)  # the pipeline writes an EOS per document too
    return tokens / (max(r[1] for r in results) - min(r[0] for r in results)), tokens / sum(r[3] for r in results)


def pipeline(corpus: Path, tokenizer: Path, workers: int, work: Path) -> tuple[float, float, float, float]:
    """The whole shard command: tokens per wall second and per CPU second (parent and workers), and the
    CPU seconds of the parent process and of the worker processes (0 with one worker, which runs in
    the parent)."""
    out = work / f"shards_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    meta = shard_corpus([str(corpus)], tokenizer, out, workers=workers, val_fraction=0.01, progress=False,
                        log=lambda *a: None)
    elapsed = time.perf_counter() - start
    parent, kids = time.process_time() - cpu, _children_cpu() - children
    return meta.extra["tokens"] / elapsed, meta.extra["tokens"] / (parent + kids), parent, kids


def main() -> None:
    global _docs, _model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the docstring corpus")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=2, help="best of this many runs per measurement")
    parser.add_argument("--work-dir", default="")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    docs = [text for text, _ in iter_docstrings(min_chars=50)]
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(args.repeat):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    _docs = docs * args.repeat
    tokenizer = work / "tok"
    train_tokenizer([str(corpus)], tokenizer, vocab_size=args.vocab_size, sample_docs=20000, overwrite=True,
                    log=lambda *a: None)
    _model = str(tokenizer / "tokenizer.model")
    mb = corpus.stat().st_size / 1e6
    print(f"# {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# corpus: {len(_docs)} stdlib docstrings ({mb:.1f} MB .jsonl), vocab {args.vocab_size}")
    print(f"# load average before: {os.getloadavg()[0]:.1f} (wall-clock figures need an otherwise idle machine)")
    rows = {}
    for w in args.workers:
        pipes = [pipeline(corpus, tokenizer, w, work) for _ in range(args.trials)]
        ceils = [ceiling(w) for _ in range(args.trials)]
        pipe = (max(p[0] for p in pipes), max(p[1] for p in pipes))
        fastest = max(pipes, key=lambda p: p[0])
        ceil = (max(c[0] for c in ceils), max(c[1] for c in ceils))
        rows[w] = (pipe, ceil)
        print(f"workers={w}: pipeline {pipe[0]:,.0f} tokens/s ({pipe[1]:,.0f} per CPU-s), ceiling {ceil[0]:,.0f} "
              f"tokens/s ({ceil[1]:,.0f} per CPU-s); pipeline/ceiling {pipe[0] / ceil[0]:.2f} wall, "
              f"{pipe[1] / ceil[1]:.2f} CPU; CPU-s of the fastest run: parent {fastest[2]:.2f}, workers {fastest[3]:.2f}",
              flush=True)
    if 1 in rows and 2 in rows:
        print(f"speed-up 1 -> 2 workers (wall): pipeline {rows[2][0][0] / rows[1][0][0]:.2f}x, "
              f"ceiling {rows[2][1][0] / rows[1][1][0]:.2f}x")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
