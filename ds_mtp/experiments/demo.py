"""`ds-mtp demo`: NTP vs MTP vs LSE-MTP on the paper's USG world, as reproduce's `demo` scale (the `cpu` recipe
on 2 CPU ranks, one seed) evaluated by decoding every held-out pair (ds_mtp.experiments.evaluate.paths: success
as the paper's test_accuracy.py counts it, the first arrival at the target, and ds-mtp's strict success,
end-of-sequence there). Methods are compared only once each has converged (docs/results.md).

Everything is reproduce's: the world, the runs (RUN_DIR/runs/<method>-seed0/), report.md and results.json; the
demo adds its own table of path success. Running it again shows the finished runs' results without training.
"""

from __future__ import annotations

from pathlib import Path

from ds_mtp.data import write_atomic
from ds_mtp.errors import UserError
from ds_mtp.experiments.reproduce import (CONVERGENCE_TOLERANCE, HELDOUT_CE, SCALES, SETTINGS_FILE,
                                          ReproduceResult, reproduce, unconverged)

DEMO_METHODS = ("ntp", "mtp", "lse-mtp")
K = 4
TABLE_FILE = "demo.md"


def demo_rows(result: ReproduceResult) -> list[dict]:
    """One row per method: held-out ce_1 and greedy path decoding on every held-out pair."""
    rows = []
    for run in result.runs:
        greedy = run["results"]["metrics"]["paths"]["greedy"]
        rows.append({"method": run["name"], "K": run["k"], "lambda": run["lambda"],
                     "heldout_ce_1": run["metrics"][HELDOUT_CE], "steps": run["steps"],
                     "train_seconds": run["train_seconds"], "pairs": greedy["pairs"],
                     **{m: greedy[m] for m in ("success", "illegal_edge", "wrong_target")},
                     "success_strict": greedy["strict"]["success"]})
    return rows


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


def demo_overrides(steps: int) -> list[str]:
    """A shorter budget than the scale's (--steps), with six held-out evaluations along it."""
    return [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 6)}"] if steps else []


def run_demo(run_dir: str | Path, steps: int = 0, nproc: int = 2, seed: int = 0) -> list[dict]:
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / SETTINGS_FILE).is_file():
        raise UserError(f"{run_dir} holds something other than a demo (no {SETTINGS_FILE}; an older ds-mtp's demo?): "
                        "remove it or choose another --run-dir")
    command = f"ds-mtp demo --run-dir {run_dir}" + (f" --steps {steps}" if steps else "") + \
        (f" --nproc {nproc}" if nproc != SCALES["demo"].nproc else "") + (f" --seed {seed}" if seed else "")
    result = reproduce("usg", list(DEMO_METHODS), 1, "demo", run_dir, k=K, nproc=nproc, resume=True,
                       overrides=demo_overrides(steps), world_seed=seed, command=command)
    rows = demo_rows(result)
    table = format_table(rows)
    verdicts = "\n".join(f"- {line}" for line in comparison_lines(rows))
    caption = (f"Greedy decoding from `src tgt` on {rows[0]['pairs']} held-out pairs of the USG world, "
               f"{rows[0]['steps']} steps per method (rates; path success = the first arrival at the target, as the "
               "paper's test_accuracy.py; strict = end-of-sequence at it)")
    write_atomic(run_dir / TABLE_FILE, f"{caption}.\n\n{table}\n\n{verdicts}\n".encode())
    print(f"\n{caption}:\n{table}\n\n{verdicts}\n")
    print(f"[demo] table: {run_dir / TABLE_FILE}; full report: {run_dir / 'report.md'}")
    print(f"[demo] TensorBoard: tensorboard --logdir {run_dir / 'runs'}  (one run per method; eval/ce_1 is the "
          "held-out curve)")
    return rows


