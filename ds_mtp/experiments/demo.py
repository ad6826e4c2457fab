"""`ds-mtp demo`: NTP vs MTP vs LSE-MTP on the paper's USG world, trained with DeepSpeed on 2 CPU ranks
and evaluated by greedy decoding on every held-out pair (ds_mtp.experiments.evaluate.paths: success as the paper's
test_accuracy.py counts it, the first arrival at the target, and ds-mtp's strict success, end-of-sequence
there). The recipe is reproduce's `cpu` scale with one seed (docs/results.md: every method's held-out ce_1
is within 5% of the others' by its last step); methods are compared only once each has converged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ds_mtp.data import has_manifest, write_atomic
from ds_mtp.experiments.reproduce import (CONVERGENCE_TOLERANCE, METHODS, SCALES, final_heldout_ce, sequence_lengths,
                              train_run, unconverged)

DEMO_METHODS = ("ntp", "mtp", "lse-mtp")
K = 4
EVAL_PAIRS = 0  # every held-out pair, as test_accuracy.py decodes them
WINDOW = 24  # tokens per packed window: the USG world's longest path (21 tokens) fits


def demo_overrides(world_dir: Path, key: str, steps: int, seed: int, nproc: int) -> list[str]:
    """reproduce's `cpu` recipe (the global batch split over the ranks), one method, one seed."""
    scale = SCALES["cpu"]
    overrides = [*scale.train, f"data.path={world_dir}", f"data.sampling={scale.sampling}",
                 f"train.seq_len={WINDOW}", f"train.micro_batch={max(1, scale.global_batch // nproc)}",
                 *METHODS[key].overrides(K), f"train.seed={seed}"]
    return overrides + ([f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 6)}"] if steps else [])


def format_table(rows: list[dict]) -> str:
    header = ("| method | K | λ_l = λ_s | held-out ce_1 | path success | illegal edge | wrong target | "
              "strict success | train s |")
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['K']} | {r['lambda']} | {r['heldout_ce_1']:.3f} | {r['success']:.3f} | "
                     f"{r['illegal_edge']:.3f} | {r['wrong_target']:.3f} | {r['success_strict']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def comparison_lines(rows: list[dict]) -> list[str]:
    """What may be said between the methods: path success relative to NTP for each converged method, and one
    line for each method that has not converged."""
    lagging = unconverged({r["method"]: r["heldout_ce_1"] for r in rows})
    base = rows[0]
    lines = [lagging[r["method"]] if r["method"] in lagging else
             f"{r['method']}: converged (held-out ce_1 {r['heldout_ce_1'] / base['heldout_ce_1']:.2f}x {base['method']}'s,"
             f" within {CONVERGENCE_TOLERANCE:.0%}); path success {r['success']:.3f} vs {base['method']}'s "
             f"{base['success']:.3f}" for r in rows[1:]]
    if base["method"] in lagging:
        lines.insert(0, lagging[base["method"]])
    return lines


def run_demo(run_dir: str | Path, steps: int = 0, nproc: int = 2, seed: int = 0) -> list[dict]:
    from ds_mtp.experiments.evaluate.paths import evaluate_paths
    from ds_mtp.model import load_exported
    from ds_mtp.monitor import read_metrics
    from ds_mtp.experiments.worlds import load_world, make_world

    run_dir = Path(run_dir)
    world_dir = run_dir / "world"
    if not has_manifest(world_dir):
        print(f"[demo] generating the USG world (100 nodes) into {world_dir}", flush=True)
        make_world("usg", "paper", world_dir, seed=seed)
    world = load_world(world_dir)
    assert sequence_lengths(world_dir) <= WINDOW, "the USG world's paths fit the demo's window"
    print(f"[demo] {len(world.train_pairs)} train / {len(world.heldout_pairs)} held-out pairs, "
          f"vocab {world.vocab_size}", flush=True)
    rows = []
    for key in DEMO_METHODS:
        method = METHODS[key]
        method_dir = run_dir / key
        if method_dir.exists():
            shutil.rmtree(method_dir)  # an unfinished demo run: the demo owns this directory
        overrides = demo_overrides(world_dir, key, steps, seed, nproc)
        k = K if method.multi_token else 1
        print(f"[demo] training {method.name} (K={k}, λ_l=λ_s={method.lam}) on {nproc} CPU ranks", flush=True)
        seconds = train_run(method_dir, overrides, nproc, resume=False)
        model = load_exported(method_dir / "model")
        result = evaluate_paths(model, world, max_pairs=EVAL_PAIRS, temperature=0.0, seed=seed,
                                max_moves=model.cfg.max_seq_len - 3)
        metrics = read_metrics(method_dir / "metrics.jsonl")
        rows.append({"method": method.name, "K": k, "lambda": method.lam, "ce_1": metrics[-1]["ce_1"],
                     "heldout_ce_1": final_heldout_ce(metrics), "steps": metrics[-1]["step"],
                     "train_seconds": seconds, **{m: result[m] for m in ("success", "illegal_edge", "wrong_target")},
                     "success_strict": result["strict"]["success"], "pairs": result["pairs"]})
    table = format_table(rows)
    verdicts = "\n".join(f"- {line}" for line in comparison_lines(rows))
    caption = (f"Greedy decoding from `src tgt` on {rows[0]['pairs']} held-out pairs of the USG world, "
               f"{rows[0]['steps']} steps per method (rates; path success = the first arrival at the target, as the "
               "paper's test_accuracy.py; strict = end-of-sequence at it)")
    write_atomic(run_dir / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    write_atomic(run_dir / "results.md", f"{caption}.\n\n{table}\n\n{verdicts}\n".encode())
    print(f"\n{caption}:\n{table}\n\n{verdicts}\n")
    print(f"[demo] results: {run_dir / 'results.md'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {run_dir}  (one run per method; eval/ce_1 is the held-out curve)")
    return rows
