"""Same tiny run through each launch path on this machine: wall time from `ds-mtp launch` to exit, and
the median tokens/s of the steps after the first (from metrics.jsonl).

    OMP_NUM_THREADS=1 python bench/launchers.py --steps 20 --out /tmp/bench-launchers

Paths: deepspeed on one node (2 ranks), mpirun -n 2 (mpi4py discovery), two "nodes" on localhost
(--no-ssh --node-rank 0/1). All three train the same model on the same windows, so the losses must
agree, which the script checks. Compare the figures as ratios within one run (a shared machine is noisy).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_mtp.data import has_manifest  # noqa: E402
from ds_mtp.ranks import free_port  # noqa: E402
from ds_mtp.monitor import read_metrics  # noqa: E402
from tests.conftest import make_token_data  # noqa: E402


def run_path(name: str, out: Path, data: Path, steps: int) -> dict:
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    common = ["--run-dir", str(run), f"data.path={data}", "model.preset=tiny", "model.mtp_k=2", "train.seq_len=64",
              "train.micro_batch=8", f"train.max_steps={steps}", "train.save_model=false"]
    launch = [sys.executable, "-m", "ds_mtp.cli", "launch", "--master-port", str(free_port())]
    started = time.perf_counter()
    if name == "two-nodes-no-ssh":
        hostfile = out / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        nodes = [subprocess.Popen([*launch, "--hostfile", str(hostfile), "--no-ssh", "--master-addr", "127.0.0.1",
                                   "--node-rank", str(r), *common], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT) for r in (0, 1)]
        codes = [p.wait() for p in nodes]
    else:
        extra = ["--launcher", "mpirun"] if name == "mpirun" else []
        codes = [subprocess.call([*launch, *extra, "--nproc", "2", *common], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT)]
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"{name}: exit codes {codes}")
    rows = read_metrics(run / "metrics.jsonl")
    return {"name": name, "wall_s": wall, "tok_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "losses": [round(r["loss"], 5) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="/tmp/bench-launchers")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not has_manifest(data):
        make_token_data(data)
    results = [run_path(name, out, data, args.steps) for name in ("deepspeed-1-node", "mpirun", "two-nodes-no-ssh")]
    base = results[0]
    print(f"| path | wall s | median tokens/s (steps 2..{args.steps}) | tokens/s vs deepspeed |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f} |")
    same = all(r["losses"] == base["losses"] for r in results)
    print(f"losses identical across paths: {same}")


if __name__ == "__main__":
    main()
