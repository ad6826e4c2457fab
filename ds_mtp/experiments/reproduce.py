"""`ds-mtp reproduce`: train NTP, MTP and LSE-MTP over several seeds on one graph world, evaluate
every exported model, and write a report with mean ± 95% confidence intervals over seeds.

Layout of OUT:

    reproduce.json          the settings (a resumed run must match them)
    world/                  the world dataset (make_world, once for all runs)
    runs/<method>-seed<S>/  one `ds-mtp train` run each (metrics.jsonl, tensorboard/, model/, train.log)
                            plus eval.json once evaluated: a run with eval.json is complete
    results.json            every run's headline metrics and the per-method summary
    report.md, plots/*.png  the tables, the paper's findings checked, the plots

Every run trains in its own `ds-mtp train` process (the DeepSpeed engine, ZeRO-3), so a crash or
an interruption loses at most that run: `--resume` skips complete runs, evaluates trained ones and
continues interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_mtp.data import has_manifest, write_atomic
from ds_mtp.errors import UserError
from ds_mtp.run_dir import RunDir

SETTINGS_FILE = "reproduce.json"
EVAL_FILE = "eval.json"
LAMBDA_LSE = 0.1  # the paper's λ_l = λ_s


@dataclass(frozen=True)
class Method:
    name: str
    """Display name (NTP, MTP, LSE-MTP)."""
    multi_token: bool
    """Uses K heads (else K = 1)."""
    lam: float
    """λ_l = λ_s."""

    def overrides(self, k: int) -> list[str]:
        return [f"model.mtp_k={k if self.multi_token else 1}", f"objective.lambda_latent={self.lam}",
                f"objective.lambda_semantic={self.lam}"]


METHODS = {"ntp": Method("NTP", False, 0.0), "mtp": Method("MTP", True, 0.0),
           "lse-mtp": Method("LSE-MTP", True, LAMBDA_LSE)}

# Overrides that reproduce owns: they define the methods and the seeds.
RESERVED_OVERRIDES = ("model.mtp_k", "objective.lambda_latent", "objective.lambda_semantic", "data.path",
                      "data.split", "train.seed")


@dataclass
class Scale:
    """A training and evaluation budget."""

    name: str
    train: list[str]
    """Overrides for `ds-mtp train` (section.field=value), before the method's and the user's."""
    eval_scale: str | dict
    """The evaluation budget passed to the metric suite ("default", "quick" or a dict)."""
    global_batch: int
    """Windows per optimizer step over all ranks (micro_batch = global_batch / nproc); each window of the world's
    longest path length holds whole paths packed together (data.sampling=packed_documents)."""
    nproc: int
    """Ranks per training run when --nproc is not given (0 = one per GPU, at least 1)."""
    manhattan_pairs: int = 20_000
    """Origin/destination pairs sampled on graphs too large to use every pair (Manhattan)."""
    sampling: str = "packed_documents"
    """data.sampling of the runs: whole paths packed into windows (masked), or "document" (one padded path per
    row, the paper's batches)."""
    metrics: tuple[str, ...] | None = None
    """The metrics of the suite to evaluate (ds_mtp.experiments.evaluate.suite.METRICS); None = all."""
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "train": list(self.train), "eval_scale": self.eval_scale,
                "global_batch": self.global_batch, "nproc": self.nproc, "manhattan_pairs": self.manhattan_pairs,
                "sampling": self.sampling, "metrics": list(self.metrics) if self.metrics else None}


SCALES = {
    # The recipe measured in docs/results.md: on USG every method's held-out ce_1 comes within a few percent of the
    # others' by step 1200-1600 (32 packed windows of 24 tokens, ~72 paths, per step). ZeRO-1: for this
    # 1.1M-parameter model ZeRO-3's per-parameter gathers cost more than the compute on a CPU
    # (docs/benchmarks.md). 3 seeds take 32 minutes.
    "cpu": Scale("cpu", ["model.preset=paper-graph", "train.max_steps=1600", "train.lr=2e-3", "train.min_lr_ratio=0.1",
                         "train.weight_decay=0.1", "train.grad_clip=1.0", "train.beta1=0.9", "train.beta2=0.95",
                         "train.precision=fp32", "train.zero_stage=1", "train.log_every=200", "train.eval_every=100"],
                 # the papers' trial counts, except Vafa et al.'s compression / distinction trials (the slow ones)
                 eval_scale={"compression_trials": 20, "distinction_trials": 40}, global_batch=32, nproc=1,
                 manhattan_pairs=20_000,
                 description="the paper's model (6L/6H/d=120), 1600 steps of 32 windows of whole paths (packed, "
                             "masked), lr 2e-3 cosine, fp32, ZeRO-1; evaluation at the papers' sizes except 20 "
                             "compression and 40 distinction trials"),
    # The paper's set-up (Zhong et al., appendix): batch 1024, 20k steps, lr 5e-4 -> 5e-5 cosine after 1k warm-up,
    # AdamW(0.9, 0.95), weight decay 0.1, clip 1.0, bf16 on GPU.
    "paper": Scale("paper", ["model.preset=paper-graph", "train.max_steps=20000", "train.lr=5e-4",
                             "train.min_lr_ratio=0.1", "train.warmup_steps=1000", "train.weight_decay=0.1",
                             "train.grad_clip=1.0", "train.beta1=0.9", "train.beta2=0.95", "train.precision=auto",
                             "train.save_every=2000", "train.log_every=1000", "train.eval_every=1000"],
                   eval_scale="default", global_batch=1024, nproc=0, manhattan_pairs=200_000, sampling="document",
                   description="the paper's set-up: 6L/6H/d=120, batch 1024 paths (one per padded row), 20k steps, "
                               "lr 5e-4 -> 5e-5 cosine after 1k warm-up, AdamW(0.9, 0.95), wd 0.1, clip 1.0, bf16 on GPU"),
}
SCALES["demo"] = Scale(
    # `ds-mtp demo` (`make demo`): the cpu recipe on 2 ranks, evaluated by decoding every held-out pair only
    # (the paths metric; about 8 minutes on 2 cores for the three methods).
    "demo", SCALES["cpu"].train, eval_scale="default", global_batch=SCALES["cpu"].global_batch, nproc=2,
    metrics=("paths",),
    description="the cpu recipe (1600 steps of 32 packed windows, lr 2e-3 cosine, ZeRO-1) on 2 CPU ranks; "
                "path success on every held-out pair, greedy and sampled")


# ----------------------------------------------------------------------------------------------
# Evaluation: the one place that knows the metric suite's API.

def evaluate_model(model, world, eval_scale, seed: int, metrics=None) -> tuple[dict, dict[str, float]]:
    """(full results, headline metrics {name: value}) of one exported model on the world."""
    from ds_mtp.experiments.evaluate.suite import evaluate_all, headline

    results = evaluate_all(model, world, scale=eval_scale, seed=seed, metrics=list(metrics) if metrics else None)
    return results, headline(results)


# ----------------------------------------------------------------------------------------------
# Statistics

def t_critical(n: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value for n samples (n - 1 degrees of freedom); nan below 2."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def mean_ci(values) -> dict:
    """Mean and 95% CI half-width (t over seeds) of the finite values; n counts them."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    half = t_critical(n) * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": half, "n": n}


def summarize(runs: list[dict], methods: list[str]) -> dict:
    """{method: {metric: mean_ci}} over the runs of each method."""
    summary = {}
    for key in methods:
        mine = [r for r in runs if r["method"] == key]
        names = sorted({m for r in mine for m in r["metrics"]})
        summary[key] = {m: mean_ci([r["metrics"].get(m, float("nan")) for r in mine]) for m in names}
    return summary


def format_value(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.2e}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def format_cell(stat: dict | None) -> str:
    if not stat or stat["n"] == 0:
        return "—"
    if stat["n"] < 2:
        return f"{format_value(stat['mean'])} (n=1)"
    return f"{format_value(stat['mean'])} ± {format_value(stat['ci95'])}"


# ----------------------------------------------------------------------------------------------
# Convergence: methods are compared only once each has learned the task.

CONVERGENCE_TOLERANCE = 0.10
"""Two methods are compared only when their held-out ce_1 are within this fraction of each other."""
HELDOUT_CE = "heldout_ce_1"
"""The metric name of a run's last held-out next-token cross-entropy (metrics.jsonl's eval_ce_1)."""


def final_heldout_ce(rows: list[dict]) -> float:
    """The last eval_ce_1 of a run's metrics rows (NaN when the run never evaluated)."""
    values = [r["eval_ce_1"] for r in rows if r.get("eval_ce_1") is not None]
    return values[-1] if values else float("nan")


def unconverged(heldout_ce: dict[str, float], tolerance: float = CONVERGENCE_TOLERANCE) -> dict[str, str]:
    """{name: one line} for each method whose held-out ce_1 is more than ``tolerance`` above the lowest of
    ``heldout_ce`` ({display name: held-out ce_1}), or unknown: a comparison with it would set a model still
    learning the task against a trained one."""
    known = {name: ce for name, ce in heldout_ce.items() if math.isfinite(ce)}
    lines = {name: f"{name} has no held-out ce_1 (trained without train.eval_every), so it is compared with nothing"
             for name in heldout_ce if name not in known}
    if known:
        best = min(known, key=known.get)
        for name, ce in known.items():
            if ce > (1 + tolerance) * known[best]:
                lines[name] = (f"{name} has not converged: held-out ce_1 {ce:.3f} is {ce / known[best]:.2f}x "
                               f"{best}'s {known[best]:.3f} (more than {tolerance:.0%} above)")
    return lines


# ----------------------------------------------------------------------------------------------
# The paper's findings, checked on the means (and whether the 95% CIs separate).

# Metric groups of the report: (title, what the metric names start with).
TABLES = [
    ("Structure Gain (the paper; higher = states sharing the k-ahead token are more alike)", ("structure_gain",)),
    ("Belief compression / goal distinction (the paper: mean cosine similarity of states per group)",
     ("belief_", "goal_distinction", "node_distinction")),
    ("Illegal Shortcut Probability and Legal Step Probability (the paper)", ("isp", "legal_", "mean_legal_")),
    ("Path decoding on held-out pairs (the paper; rates, greedy and sampled at T = 0.8)",
     ("path_success", "illegal_edge", "wrong_target", "invalid_format")),
    ("Vafa et al. (NeurIPS 2024)", ("next_token_validity", "sequence_validity", "probe_", "compression_",
                                    "distinction_", "detour_")),
]


@dataclass
class Finding:
    text: str
    chain: list[tuple[str, str, str]]
    """[(method a, relation, method b)] all of which must hold; relation is "<", "<=" or ">", ">="."""
    metric_candidates: tuple[str, ...]
    """Headline metric names to use, the first present wins."""


FINDINGS = [
    Finding("ISP(LSE-MTP) < ISP(NTP) < ISP(MTP)", [("lse-mtp", "<", "ntp"), ("ntp", "<", "mtp")],
            ("isp",)),
    Finding("belief similarity (same node, same goal): LSE-MTP ≥ MTP > NTP", [("lse-mtp", ">=", "mtp"),
                                                                             ("mtp", ">", "ntp")],
            ("belief_same_node_same_goal",)),
    Finding("Structure Gain (k = 2): MTP > NTP", [("mtp", ">", "ntp")], ("structure_gain_k2",)),
    Finding("Structure Gain (k = 3): MTP > NTP", [("mtp", ">", "ntp")], ("structure_gain_k3",)),
]


def check_finding(finding: Finding, summary: dict) -> str:
    """One line: holds / does not hold (on the means), with whether the CIs are disjoint; or not judged, when
    a method it compares has not converged (CONVERGENCE_TOLERANCE)."""
    involved = sorted({x for a, _, b in finding.chain for x in (a, b)})
    lagging = unconverged({METHODS[k].name: summary.get(k, {}).get(HELDOUT_CE, {}).get("mean", float("nan"))
                           for k in involved if k in summary})
    if lagging:
        return f"- {finding.text}: **not judged** — {'; '.join(lagging.values())}"
    metric = next((m for m in finding.metric_candidates
                   if all(m in summary.get(a, {}) and m in summary.get(b, {}) for a, _, b in finding.chain)), None)
    if metric is None:
        needed = sorted({x for a, _, b in finding.chain for x in (a, b)})
        return f"- {finding.text}: **not tested** (needs the methods {', '.join(needed)} and one of the metrics " \
               f"{', '.join(finding.metric_candidates)})"
    parts, holds, separated, intervals = [], True, True, True
    for a, rel, b in finding.chain:
        sa, sb = summary[a][metric], summary[b][metric]
        ma, mb = sa["mean"], sb["mean"]
        ok = {"<": ma < mb, "<=": ma <= mb, ">": ma > mb, ">=": ma >= mb}[rel]
        holds &= bool(ok)
        if math.isfinite(sa["ci95"]) and math.isfinite(sb["ci95"]):
            separated &= (sa["mean"] + sa["ci95"] < sb["mean"] - sb["ci95"]) or \
                         (sb["mean"] + sb["ci95"] < sa["mean"] - sa["ci95"])
        else:
            separated = intervals = False
        parts.append(f"{METHODS[a].name} {format_value(ma)} {rel} {METHODS[b].name} {format_value(mb)}: "
                     f"{'yes' if ok else 'no'}")
    verdict = "**holds**" if holds else "**does not hold**"
    if holds:
        verdict += (" (95% CIs disjoint)" if separated else " on the means, but the 95% CIs overlap") if intervals \
            else " on the means (no confidence interval: fewer than 2 seeds)"
    return f"- {finding.text} [{metric}]: {verdict} — {'; '.join(parts)}"


# ----------------------------------------------------------------------------------------------
# Plots

def plot_metric_bars(summary: dict, methods: list[str], path: Path) -> Path:
    """One panel per headline metric: a bar per method (mean) with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for k in methods for m in summary.get(k, {})})
    cols = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, metric in zip(axes.flat, metrics):
        means = [summary[k].get(metric, {}).get("mean", float("nan")) for k in methods]
        errs = [summary[k].get(metric, {}).get("ci95", float("nan")) for k in methods]
        errs = [e if math.isfinite(e) else 0.0 for e in errs]
        ax.bar(range(len(methods)), [m if math.isfinite(m) else 0.0 for m in means], yerr=errs, capsize=4,
               color=colors[: len(methods)])
        ax.set_xticks(range(len(methods)), [METHODS[k].name for k in methods], fontsize=8)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("mean over seeds, error bar = 95% CI (t)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (2.6 * rows)))  # keep the title clear of the top panels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(runs: list[dict], methods: list[str], out_dir: Path, path: Path) -> Path:
    """Held-out next-token cross-entropy (eval_ce_1: what convergence is judged on), training ce_1 and total
    loss per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_mtp.monitor import read_metrics

    fig, (ax_held, ax_ce, ax_loss) = plt.subplots(1, 3, figsize=(14, 3.6))
    colors = dict(zip(METHODS, ["#4c72b0", "#dd8452", "#55a868"]))
    for key in methods:
        for i, run in enumerate(r for r in runs if r["method"] == key):
            rows = read_metrics(RunDir(out_dir / run["run_dir"]).metrics)
            if not rows:
                continue
            steps = [r["step"] for r in rows]
            label = METHODS[key].name if i == 0 else None
            evals = [(r["step"], r["eval_ce_1"]) for r in rows if r.get("eval_ce_1") is not None]
            if evals:
                ax_held.plot(*zip(*evals), color=colors[key], alpha=0.8, lw=1, marker=".", label=label)
            ax_ce.plot(steps, [r["ce_1"] for r in rows], color=colors[key], alpha=0.8, lw=1, label=label)
            ax_loss.plot(steps, [r["loss"] for r in rows], color=colors[key], alpha=0.8, lw=1, label=label)
    for ax, title in ((ax_held, "held-out next-token cross-entropy (eval_ce_1)"),
                      (ax_ce, "training next-token cross-entropy ce_1"), (ax_loss, "total training loss")):
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Settings, world, runs

def parse_methods(text: str) -> list[str]:
    keys = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not keys:
        raise UserError("--methods is empty (choose from ntp, mtp, lse-mtp)")
    unknown = [m for m in keys if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(keys))


def resolve_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise UserError(f"unknown scale '{scale}' (choose from {', '.join(SCALES)})")
    return SCALES[scale]


def default_nproc(scale: Scale) -> int:
    if scale.nproc:
        return scale.nproc
    import torch

    return max(1, torch.cuda.device_count())


def world_source(world: str) -> tuple[str, Path | None]:
    """("make", None) for a world name make_world knows, ("dir", path) for an existing world directory."""
    path = Path(world)
    if world not in ("usg", "er", "manhattan") and not world.startswith("edges:"):
        if (path / "world.json").is_file() and has_manifest(path):
            return "dir", path.resolve()
        if path.exists():
            raise UserError(f"--world {world}: not a world directory (needs world.json and manifest.json; "
                            "make one with `ds-mtp world make`)")
        raise UserError(f"unknown world '{world}' (expected usg, er, manhattan, edges:PATH or a world directory)")
    return "make", None


def world_make_args(world: str, scale: Scale) -> tuple[str, dict]:
    """The dataset and parameters make_world gets: the paper's dataset on its graphs, shortest paths on
    street maps (Vafa et al.), with sampled pairs where a graph is too large to use every pair."""
    if world in ("usg", "er"):
        return "paper", {}
    from ds_mtp.experiments.worlds import build_graph

    _, graph = build_graph(world)
    return "shortest", ({"num_pairs": scale.manhattan_pairs} if graph.num_nodes > 1000 else {})


def prepare_world(world: str, out: Path, scale: Scale, world_seed: int) -> Path:
    kind, path = world_source(world)
    if kind == "dir":
        return path
    world_dir = out / "world"
    if has_manifest(world_dir) and (world_dir / "world.json").is_file():
        return world_dir  # make_world writes the manifest last: the directory is complete
    from ds_mtp.experiments.worlds import make_world

    if world_dir.exists():
        shutil.rmtree(world_dir)  # an interrupted make_world: ours to redo
    dataset, params = world_make_args(world, scale)
    print(f"[reproduce] making the {world} world ({dataset} dataset) in {world_dir}", flush=True)
    make_world(world, dataset, world_dir, seed=world_seed, **params)
    return world_dir


def sequence_lengths(world_dir: Path) -> int:
    """Length of the longest training document (tokens, EOS included)."""
    from ds_mtp.data import TokenShards

    shards = TokenShards(world_dir, "train")
    return int(max(int(np.diff(o).max()) for o in shards.offsets if o.size > 1))


def run_overrides(scale: Scale, method: Method, k: int, seed: int, world_dir: Path, nproc: int, seq_len: int,
                  user: list[str]) -> list[str]:
    """The `ds-mtp train` overrides of one run: scale, data, batch, method, seed, then the user's."""
    micro = max(1, scale.global_batch // nproc)
    return [*scale.train, f"data.path={world_dir}", f"data.sampling={scale.sampling}", f"train.seq_len={seq_len}",
            f"model.max_seq_len={max(64, 2 * seq_len)}", f"train.micro_batch={micro}", *method.overrides(k),
            f"train.seed={seed}", *user]


def check_user_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0]
        if key in RESERVED_OVERRIDES:
            raise UserError(f"override '{item}': reproduce sets {key} itself (use --k, --methods, --seeds)")


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def train_run(run_dir: Path, overrides: list[str], nproc: int, resume: bool) -> float:
    """One `ds-mtp train` process (the deepspeed launcher when nproc > 1). Returns seconds."""
    cmd = [sys.executable, "-m", "ds_mtp.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir),
           *(["--resume"] if resume else []), *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a fresh launch, not a rank of ours
    started = time.perf_counter()
    last_error = ""
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[ds-mtp]"):
                print("   ", line.rstrip(), flush=True)
            elif line.startswith("error:"):
                last_error = line.strip()
        code = proc.wait()
    if code != 0:
        detail = f": {last_error}" if last_error else ""
        raise UserError(f"training {run_dir.name} failed (exit {code}){detail}; see {run_dir / 'train.log'}")
    return time.perf_counter() - started


def run_state(run_dir: Path) -> str:
    """complete | trained | interrupted | new."""
    if (run_dir / EVAL_FILE).is_file():
        return "complete"
    paths = RunDir(run_dir)
    if (paths.model / "model.safetensors").is_file() and (paths.model / "config.json").is_file():
        return "trained"
    if paths.has_checkpoint():
        return "interrupted"
    return "new"


def load_settings(out: Path) -> dict | None:
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: not a reproduce directory, or damaged") from None


def check_out_dir(out: Path, resume: bool, settings: dict) -> None:
    """Refuse to overwrite; on --resume, refuse settings that differ from the stored ones."""
    stored = load_settings(out) if out.is_dir() else None
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} already exists: pass --resume to continue it, or choose another --out")
        return
    if stored is None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--resume: {out} is not a reproduce directory (no {SETTINGS_FILE})")
        return
    differ = sorted(k for k in settings if k not in ("methods", "seeds") and stored.get(k) != settings[k])
    if differ:
        raise UserError(f"--resume: {out} was made with different settings ({', '.join(differ)}); "
                        "use the original options or another --out")


def machine_line() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.node()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}, " \
           f"Python {platform.python_version()}"


@dataclass
class ReproduceResult:
    out: Path
    runs: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def reproduce(world: str, methods: list[str], seeds: int, scale: str | Scale, out: str | Path, *, k: int = 4,
              nproc: int = 0, resume: bool = False, overrides: list[str] = (), world_seed: int = 0,
              command: str = "") -> ReproduceResult:
    """Train and evaluate every (method, seed) run into ``out``; write results.json, report.md, plots."""
    from ds_mtp.config import load_config
    from ds_mtp.model import load_exported
    from ds_mtp.monitor import read_metrics
    from ds_mtp.experiments.worlds import load_world

    out = Path(out)
    scale = resolve_scale(scale)
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    if k < 2:
        raise UserError(f"--k must be at least 2 for MTP and LSE-MTP (got {k})")
    nproc = nproc or default_nproc(scale)
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    overrides = list(overrides)
    check_user_overrides(overrides)
    kind, _ = world_source(world)
    if kind == "make":
        world_make_args(world, scale)  # a missing or malformed edges file fails here, before OUT is touched
    world_arg = str(Path(world).resolve()) if kind == "dir" else world
    settings = {"world": world_arg, "world_seed": world_seed, "scale": scale.to_dict(), "k": k, "nproc": nproc,
                "overrides": overrides, "methods": methods, "seeds": seeds}
    # Every run's config must load before anything is written (the data path is checked by training).
    for key in methods:
        load_config(None, run_overrides(scale, METHODS[key], k, 0, Path("."), nproc, max(k + 1, 8), overrides))
    check_out_dir(out, resume, settings)

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SETTINGS_FILE, (json.dumps(settings, indent=2) + "\n").encode())
    started = time.perf_counter()
    world_dir = prepare_world(world, out, scale, world_seed)
    world_obj = load_world(world_dir)
    seq_len = sequence_lengths(world_dir)
    if seq_len <= k:
        raise UserError(f"the world's longest training sequence has {seq_len} tokens: too short for K={k}")
    print(f"[reproduce] world {world_obj.name}: {world_obj.graph.num_nodes} nodes, {len(world_obj.graph.edges)} "
          f"edges, {len(world_obj.train_pairs)} train / {len(world_obj.heldout_pairs)} held-out pairs, "
          f"sequences up to {seq_len} tokens", flush=True)

    runs = []
    plan = [(key, seed) for seed in range(seeds) for key in methods]
    for i, (key, seed) in enumerate(plan, 1):
        method = METHODS[key]
        name = run_name(key, seed)
        run_dir = out / "runs" / name
        state = run_state(run_dir)
        if state == "complete":
            record = json.loads((run_dir / EVAL_FILE).read_text())
            print(f"[reproduce] {i}/{len(plan)} {name}: complete, skipped", flush=True)
            runs.append(record)
            continue
        run_args = run_overrides(scale, method, k, seed, world_dir, nproc, seq_len, overrides)
        train_seconds = 0.0
        if state in ("new", "interrupted"):
            if state == "new" and run_dir.exists():
                shutil.rmtree(run_dir)  # started but no checkpoint yet: nothing worth keeping
            print(f"[reproduce] {i}/{len(plan)} {name}: {'resuming' if state == 'interrupted' else 'training'} "
                  f"{method.name} (K={k if method.multi_token else 1}, λ={method.lam}) on {nproc} rank(s)", flush=True)
            train_seconds = train_run(run_dir, run_args, nproc, resume=state == "interrupted")
        eval_started = time.perf_counter()
        import torch

        model = load_exported(RunDir(run_dir).model, device="cuda" if torch.cuda.is_available() else "cpu")
        results, metrics = evaluate_model(model, world_obj, scale.eval_scale, seed, scale.metrics)
        eval_seconds = time.perf_counter() - eval_started
        rows = read_metrics(RunDir(run_dir).metrics)
        metrics[HELDOUT_CE] = final_heldout_ce(rows)
        record = {"method": key, "name": method.name, "seed": seed, "k": k if method.multi_token else 1,
                  "lambda": method.lam, "run_dir": str(Path("runs") / name), "train_seconds": train_seconds,
                  "eval_seconds": eval_seconds, "steps": rows[-1]["step"] if rows else 0,
                  "final_ce_1": rows[-1]["ce_1"] if rows else float("nan"),
                  "final_loss": rows[-1]["loss"] if rows else float("nan"),
                  "metrics": metrics, "results": results, "overrides": run_args}
        write_atomic(run_dir / EVAL_FILE, (json.dumps(record, indent=2, default=_json_default) + "\n").encode())
        print(f"[reproduce] {name}: trained {train_seconds:.0f} s, evaluated {eval_seconds:.0f} s; " +
              ", ".join(f"{m} {format_value(v)}" for m, v in list(metrics.items())[:4]), flush=True)
        runs.append(record)

    summary = summarize(runs, methods)
    total = time.perf_counter() - started
    results_doc = {"settings": settings, "world": {"name": world_obj.name, "dir": str(world_dir),
                                                    "nodes": world_obj.graph.num_nodes,
                                                    "edges": len(world_obj.graph.edges),
                                                    "train_pairs": len(world_obj.train_pairs),
                                                    "heldout_pairs": len(world_obj.heldout_pairs)},
                   "summary": summary,
                   "runs": [{k2: v for k2, v in r.items() if k2 != "results"} for r in runs],
                   "seconds_this_invocation": total}
    write_atomic(out / "results.json", (json.dumps(results_doc, indent=2, default=_json_default) + "\n").encode())
    plots = [plot_metric_bars(summary, methods, out / "plots" / "metrics.png"),
             plot_training_curves(runs, methods, out, out / "plots" / "training.png")]
    report = render_report(results_doc, methods, scale, plots, out, command)
    write_atomic(out / "report.md", report.encode())
    print(f"[reproduce] report: {out / 'report.md'} ({total:.0f} s this invocation)", flush=True)
    return ReproduceResult(out, runs, summary)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def render_report(doc: dict, methods: list[str], scale: Scale, plots: list[Path], out: Path, command: str) -> str:
    s, w, summary, runs = doc["settings"], doc["world"], doc["summary"], doc["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# ds-mtp reproduce: {', '.join(METHODS[m].name for m in methods)} on {w['name']}", "",
             f"- command: `{command or 'ds-mtp reproduce'}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine_line()}",
             f"- world: {w['name']} ({w['nodes']} nodes, {w['edges']} edges, {w['train_pairs']} train / "
             f"{w['heldout_pairs']} held-out pairs), world seed {s['world_seed']}, data in `{w['dir']}`",
             f"- scale: {scale.name} — {scale.description or 'custom'}; evaluation scale {scale.eval_scale!r}",
             f"- K = {s['k']} for MTP and LSE-MTP, λ_l = λ_s = {LAMBDA_LSE} for LSE-MTP; {len(seeds)} seed(s) "
             f"({', '.join(map(str, seeds))}); {s['nproc']} rank(s) per run"
             + (f"; extra overrides {' '.join(s['overrides'])}" if s["overrides"] else ""),
             "",
             "Cells: mean ± half-width of the 95% confidence interval over seeds (Student t, n − 1 degrees of "
             "freedom); `(n=1)` where a single seed gives no interval; — where a metric was not measured.", ""]
    all_metrics = sorted({m for k in methods for m in summary.get(k, {})})
    used = set()
    header = "| metric | " + " | ".join(METHODS[k].name for k in methods) + " |"
    rule = "| --- |" + " --- |" * len(methods)
    for title, prefixes in TABLES + [("Other metrics", None)]:
        names = [m for m in all_metrics if m not in used and (prefixes is None or m.startswith(prefixes))]
        if not names:
            continue
        used.update(names)
        lines += [f"## {title}", "", header, rule]
        lines += [f"| {m} | " + " | ".join(format_cell(summary.get(k, {}).get(m)) for k in methods) + " |"
                  for m in names]
        lines.append("")
    lines += ["## Convergence", "",
              f"Methods are compared only when their held-out next-token cross-entropy (`{HELDOUT_CE}`, the mean "
              f"over seeds of each run's last evaluation) is within {CONVERGENCE_TOLERANCE:.0%} of each other's.", ""]
    lagging = unconverged({METHODS[k].name: summary.get(k, {}).get(HELDOUT_CE, {}).get("mean", float("nan"))
                           for k in methods})
    lines += [f"- {METHODS[k].name}: held-out ce_1 {format_cell(summary.get(k, {}).get(HELDOUT_CE))}"
              + (f" — {lagging[METHODS[k].name]}" if METHODS[k].name in lagging else " — converged")
              for k in methods]
    lines += ["", "## The paper's findings", "",
              "Checked on the means over seeds; a finding counts as firmly reproduced only where the 95% CIs "
              "are disjoint, and is not judged where a method it compares has not converged.", ""]
    lines += [check_finding(f, summary) for f in FINDINGS]
    lines += ["", "The paper's figures, as a third-party note of its tables gives them (not checked against the "
              "paper's PDF): (ER / USG) ISP 2.7e-5 / 2.2e-5 (NTP), 7.8e-5 / 7.3e-5 (MTP), 2.1e-5 / 1.8e-5 "
              "(LSE-MTP, K=3); same-goal same-node similarity 0.29 / 0.22, 0.44 / 0.32, 0.46 / 0.38 (K=4).", ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
    lines += ["", "## Runs", "", "| run | K | λ | steps | final ce_1 | final loss | train s | eval s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| [{r['method']}-seed{r['seed']}]({r['run_dir']}/) | {r['k']} | {r['lambda']} | {r['steps']} | "
                     f"{format_value(r['final_ce_1'])} | {format_value(r['final_loss'])} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    lines += ["", "Train seconds: the training processes of each run, start-up included (0 where an earlier "
              "invocation trained the model and only its evaluation was left). Per-run results: "
              "`results.json` and `runs/*/eval.json`. TensorBoard: `tensorboard --logdir " + str(out / "runs") + "`.",
              ""]
    return "\n".join(lines)
