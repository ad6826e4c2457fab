"""`ds-mtp demo`: NTP vs MTP vs LSE-MTP on the paper's USG world, trained with DeepSpeed ZeRO-3 on
CPU ranks and evaluated by greedy decoding on every held-out pair (ds_mtp.evaluate.paths: success as the paper's
test_accuracy.py counts it, the first arrival at the target, and ds-mtp's strict success, end-of-sequence there)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ds_mtp.data import has_manifest, write_atomic

# (name, K, λ_latent, λ_semantic): the paper's three methods.
METHODS = [("NTP", 1, 0.0, 0.0), ("MTP", 4, 0.0, 0.0), ("LSE-MTP", 4, 0.1, 0.1)]
DEMO_STEPS = 400
EVAL_PAIRS = 0  # every held-out pair, as test_accuracy.py decodes them


def demo_overrides(world_dir: Path, K: int, lam_l: float, lam_s: float, steps: int, seed: int) -> list[str]:
    return [f"data.path={world_dir}", "data.sampling=packed_documents", "model.preset=paper-graph", f"model.mtp_k={K}",
            f"objective.lambda_latent={lam_l}", f"objective.lambda_semantic={lam_s}", "train.seq_len=24",
            "train.micro_batch=64", f"train.max_steps={steps}", "train.lr=2e-3", "train.weight_decay=0.1",
            f"train.seed={seed}", f"train.log_every={max(1, steps // 5)}"]


def train_method(run_dir: Path, overrides: list[str], nproc: int) -> float:
    """Train one method through the deepspeed launcher; stream its progress lines. Returns seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished demo run: the demo owns this directory
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "ds_mtp.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir), *overrides]
    run_dir.mkdir(parents=True)
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[ds-mtp]") or line.startswith("error:"):
                print("   ", line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"training failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    return time.perf_counter() - started


def format_table(rows: list[dict]) -> str:
    header = ("| method | K | λ_l | λ_s | final ce_1 | path success | illegal edge | wrong target | "
              "strict success | train s |")
    lines = [header, "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['K']} | {r['lambda_latent']} | {r['lambda_semantic']} | "
                     f"{r['ce_1']:.3f} | {r['success']:.3f} | {r['illegal_edge']:.3f} | {r['wrong_target']:.3f} | "
                     f"{r['success_strict']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def run_demo(run_dir: str | Path, steps: int = 0, nproc: int = 2, seed: int = 0) -> list[dict]:
    from ds_mtp.evaluate.paths import evaluate_paths
    from ds_mtp.model import load_exported
    from ds_mtp.monitor import read_metrics
    from ds_mtp.worlds import load_world, make_world

    run_dir = Path(run_dir)
    steps = steps or DEMO_STEPS
    world_dir = run_dir / "world"
    if not has_manifest(world_dir):
        print(f"[demo] generating the USG world (100 nodes) into {world_dir}", flush=True)
        make_world("usg", "paper", world_dir, seed=seed)
    world = load_world(world_dir)
    print(f"[demo] {len(world.train_pairs)} train / {len(world.heldout_pairs)} held-out pairs, "
          f"vocab {world.vocab_size}", flush=True)
    rows = []
    for name, K, lam_l, lam_s in METHODS:
        method_dir = run_dir / name.lower()
        overrides = demo_overrides(world_dir, K, lam_l, lam_s, steps, seed)
        print(f"[demo] training {name} (K={K}, λ_l={lam_l}, λ_s={lam_s}) for {steps} steps on {nproc} CPU ranks, "
              "ZeRO-3", flush=True)
        seconds = train_method(method_dir, overrides, nproc)
        model = load_exported(method_dir / "model")
        result = evaluate_paths(model, world, max_pairs=EVAL_PAIRS, temperature=0.0, seed=seed,
                                max_moves=model.cfg.max_seq_len - 3)
        last = read_metrics(method_dir / "metrics.jsonl")[-1]
        rows.append({"method": name, "K": K, "lambda_latent": lam_l, "lambda_semantic": lam_s, "ce_1": last["ce_1"],
                     "train_seconds": seconds, **{k: result[k] for k in ("success", "illegal_edge", "wrong_target")},
                     "success_strict": result["strict"]["success"], "pairs": result["pairs"]})
    table = format_table(rows)
    write_atomic(run_dir / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    write_atomic(run_dir / "results.md", (f"Greedy decoding on {rows[0]['pairs']} held-out pairs of the USG world, "
                                          f"{steps} steps per method.\n\n{table}\n").encode())
    print(f"\nGreedy decoding from `src tgt` on {rows[0]['pairs']} held-out pairs (rates; path success = the first "
          f"arrival at the target, as the paper's test_accuracy.py; strict = end-of-sequence at it):\n{table}\n")
    print(f"[demo] results: {run_dir / 'results.md'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {run_dir}  (one run per method)")
    return rows
