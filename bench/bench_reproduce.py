"""Time `ds-mtp reproduce --scale cpu` (default: usg, 3 seeds) and print a markdown line for docs/benchmarks.md.

    python bench/bench_reproduce.py --out /tmp/repro-usg [--seeds 3] [--world usg] [--resume]

Reports the wall time, the CPU seconds of all child processes (training ranks and evaluation), the
load average before and after (the machine may be shared: compare CPU seconds, not only wall), and
the per-run training / evaluation seconds from OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", default="usg")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--resume", action="store_true", help="extend an existing OUT (e.g. more seeds)")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "ds_mtp.cli", "reproduce", "--world", args.world, "--seeds", str(args.seeds),
           "--scale", args.scale, "--out", args.out, *(["--resume"] if args.resume else [])]
    load_before = os.getloadavg()
    started = time.perf_counter()
    code = subprocess.call(cmd)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    if code != 0:
        print(f"reproduce exited {code}", file=sys.stderr)
        return code
    doc = json.loads((Path(args.out) / "results.json").read_text())
    runs = doc["runs"]
    train = [r["train_seconds"] for r in runs if r["train_seconds"] > 0]
    evals = [r["eval_seconds"] for r in runs]
    print(f"\n| {datetime.date.today()} | {platform.node()}, {os.cpu_count()} cores | `{' '.join(cmd[3:])}` | "
          f"{len(runs)} runs | wall {wall:.0f} s | CPU {usage.ru_utime + usage.ru_stime:.0f} s | "
          f"train/run {min(train, default=0):.0f}-{max(train, default=0):.0f} s | "
          f"eval/run {min(evals):.0f}-{max(evals):.0f} s | load {load_before[0]:.1f} -> {load_after[0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
