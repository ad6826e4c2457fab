"""One call for every world-model metric: ``evaluate_all(model, world, scale, seed, metrics)``.

``model`` is anything with the ``PathModel`` protocol (an exported model loaded with
``ds_mtp.model.load_exported``, or a reference model); ``world`` a ``World`` or a world directory.
Every sequence fed to the model is at most ``model.cfg.max_seq_len`` tokens (and ``scale["max_len"]``).
``headline(results)`` flattens the results into ``{metric name: value}`` for tables.
See docs/worlds.md for each metric's definition and source.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ds_mtp.errors import UserError
from ds_mtp.experiments.evaluate.common import max_length

# The papers' sizes (LSE-MTP's official scripts: every held-out pair decoded at temperature 0.8, 5,000 ISP
# triples, 1,000 Structure Gain paths, 1,000 trials per belief group; Vafa et al.: 100 trials, 30 / 5 suffix
# samples, suffixes of length 5, epsilon 0.01, detour p in {0.01, 0.1}).
DEFAULT_SCALE: dict = {
    "path_pairs": 0,               # held-out pairs decoded greedily and by sampling; 0 = all (test_accuracy.py)
    "sample_temperature": 0.8,     # the sampled decoding's temperature
    "isp_triples": 5000,           # (a, b, g) triples for ISP and legal-step probability
    "structure_sequences": 1000,   # held-out shortest paths whose states Structure Gain compares
    "structure_ks": [2, 3],        # k of Structure Gain
    "belief_trials": 1000,         # prefix pairs per belief group
    "belief_prefixes": "reverse_walk",     # reverse_walk (the official script) | shortest_path (ds-mtp's variant)
    "belief_read_at": "second_to_last",    # state compared: second_to_last (the official script) | last
    "validity_sequences": 1000,    # held-out shortest paths for next-token validity
    "probe_sequences": 2000,       # held-out shortest paths whose states train / test the probe
    "probe_epochs": 100,           # passes of the probe's optimiser
    "compression_trials": 100,     # compression-precision trials
    "compression_suffixes": 30,    # continuations sampled per compression trial
    "distinction_trials": 100,     # distinction precision / recall trials
    "distinction_suffixes": 5,     # continuations sampled per distinction trial
    "suffix_length": 5,            # length of the true Myhill-Nerode boundary's continuations
    "epsilon": 0.01,               # a model accepts a token when its probability exceeds this
    "max_prefix_moves": 100,       # longest backward-walk prefix (further capped by the context)
    "detour_trials": 100,          # held-out pairs decoded per detour setting
    "detour_probs": [0.01, 0.1],   # per-step detour probabilities
    "detour_types": ["random_valid", "least_likely", "second_most_likely"],
    "max_len": 128,                # longest sequence when the model does not say (Vafa et al.'s 128)
    "batch_size": 256,             # sequences per forward pass (fewer for large vocabularies)
}

# Seconds on a CPU for a small world: for tests and smoke runs, not for conclusions.
QUICK_SCALE: dict = {
    **DEFAULT_SCALE,
    "path_pairs": 40, "isp_triples": 200, "structure_sequences": 60, "belief_trials": 40,
    "validity_sequences": 60, "probe_sequences": 60, "probe_epochs": 30, "compression_trials": 8,
    "compression_suffixes": 6, "distinction_trials": 8, "distinction_suffixes": 3, "detour_trials": 20,
    "detour_probs": [0.1], "detour_types": ["random_valid"], "max_len": 64,
}

SCALES = {"default": DEFAULT_SCALE, "quick": QUICK_SCALE}
METRICS = ("paths", "shortcuts", "structure", "belief", "validity", "probe", "compression", "distinction", "detour")


def resolve_scale(scale: dict | str) -> dict:
    """A full scale dict: a named one, or DEFAULT_SCALE updated by the given keys."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise UserError(f"unknown evaluation scale '{scale}' (expected one of: {', '.join(SCALES)})")
        return dict(SCALES[scale])
    unknown = set(scale) - set(DEFAULT_SCALE)
    if unknown:
        raise UserError(f"unknown evaluation scale key(s): {', '.join(sorted(unknown))}")
    return {**DEFAULT_SCALE, **scale}


def resolve_metrics(metrics: list[str] | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)} (expected some of: {', '.join(METRICS)})")
    return [m for m in METRICS if m in metrics]


def _run_metric(name: str, model, world, sc: dict, seed: int, max_len: int) -> dict:
    from ds_mtp.experiments.evaluate import paper, vafa
    from ds_mtp.experiments.evaluate.paths import evaluate_paths

    bs = sc["batch_size"]
    common = {"seed": seed, "batch_size": bs}
    if name == "paths":
        max_moves = max(1, min(world.graph.num_nodes - 1, max_len - 3))
        return {"greedy": evaluate_paths(model, world, sc["path_pairs"], 0.0, max_moves=max_moves, **common),
                "sampled": evaluate_paths(model, world, sc["path_pairs"], sc["sample_temperature"],
                                          max_moves=max_moves, **common)}
    if name == "shortcuts":
        return paper.illegal_shortcuts(model, world, sc["isp_triples"], **common)
    if name == "structure":
        return paper.structure_gain(model, world, tuple(sc["structure_ks"]), sc["structure_sequences"],
                                    max_len=max_len, **common)
    if name == "belief":
        return paper.belief_similarity(model, world, sc["belief_trials"], max_len=max_len,
                                       prefixes=sc["belief_prefixes"], read_at=sc["belief_read_at"], **common)
    if name == "validity":
        return vafa.next_token_validity(model, world, sc["validity_sequences"], max_len=max_len, **common)
    if name == "probe":
        return vafa.state_probe(model, world, sc["probe_sequences"], max_len=max_len, epochs=sc["probe_epochs"],
                                **common)
    if name == "compression":
        return vafa.compression_precision(model, world, sc["compression_trials"], sc["compression_suffixes"],
                                          sc["epsilon"], sc["max_prefix_moves"], max_len=max_len, **common)
    if name == "distinction":
        return vafa.distinction(model, world, sc["distinction_trials"], sc["distinction_suffixes"],
                                sc["suffix_length"], sc["epsilon"], sc["max_prefix_moves"], max_len=max_len, **common)
    if name == "detour":
        return {f"{kind}_p{p:g}": vafa.detour_robustness(model, world, float(p), kind, sc["detour_trials"],
                                                         max_len=max_len, **common)
                for kind in sc["detour_types"] for p in sc["detour_probs"]}
    raise AssertionError(name)


def evaluate_all(model, world, scale: dict | str = "default", seed: int = 0, metrics: list[str] | None = None) -> dict:
    """Every requested metric of ``model`` on ``world``; nested, JSON-serialisable results."""
    from ds_mtp.experiments.worlds import World, load_world

    if not isinstance(world, World):
        world = load_world(Path(world))
    sc = resolve_scale(scale)
    names = resolve_metrics(metrics)
    max_len = max_length(model, sc["max_len"])
    if max_len < 4:
        raise UserError(f"the model's context ({max_len} tokens) is too short for path sequences")
    results: dict = {"world": {"name": world.name, "format": world.format, "num_nodes": world.graph.num_nodes,
                               "num_edges": len(world.graph.edges), "vocab_size": world.vocab_size,
                               "heldout_pairs": len(world.heldout_pairs)},
                     "seed": seed, "scale": sc, "max_len": max_len, "metrics": {}, "seconds": {}}
    for name in names:
        started = time.perf_counter()
        results["metrics"][name] = _jsonable(_run_metric(name, model, world, sc, seed, max_len))
        results["seconds"][name] = round(time.perf_counter() - started, 3)
    return results


def _jsonable(x):
    """Plain JSON types: tuples to lists, numpy scalars to Python, NaN to None; record lists dropped."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def headline(results: dict) -> dict[str, float]:
    """Flat ``{metric name: value}`` of the headline numbers (metrics that could not be computed,
    such as ISP in the direction format, are left out)."""
    m = results.get("metrics", {})
    out: dict[str, float | None] = {}
    if "paths" in m:
        for mode in ("greedy", "sampled"):
            for outcome in ("success", "illegal_edge", "wrong_target", "invalid_format"):
                out[f"{'path_success' if outcome == 'success' else outcome}_{mode}"] = m["paths"][mode][outcome]
            out[f"path_success_strict_{mode}"] = m["paths"][mode]["strict"]["success"]
    if "shortcuts" in m:
        for key in ("isp", "legal_step_probability", "mean_legal_move_probability"):
            out[key] = m["shortcuts"][key]
    if "structure" in m:
        for key, value in m["structure"].items():
            if key.startswith("k") and key[1:].isdigit():
                out[f"structure_gain_{key}"] = None if value is None else value["gain"]
    if "belief" in m:
        b = m["belief"]
        for group in ("same_node_same_goal", "same_node_diff_goal", "diff_node_same_goal", "diff_node_diff_goal"):
            out[f"belief_{group}"] = b[group]["cosine"]
        baseline = b["diff_node_diff_goal"]["cosine"]
        for group in ("same_node_same_goal", "same_node_diff_goal", "diff_node_same_goal"):
            # Above the different-node / different-goal pairs: a model whose states are all alike scores 0 here.
            if b[group]["cosine"] is not None and baseline is not None:
                out[f"belief_{group}_minus_baseline"] = b[group]["cosine"] - baseline
        out["goal_distinction"] = b["goal_distinction"]
        out["node_distinction"] = b["node_distinction"]
    if "validity" in m:
        out["next_token_validity"] = m["validity"]["validity"]
        out["sequence_validity"] = m["validity"]["sequence_validity"]
    if "probe" in m:
        out["probe_accuracy"] = m["probe"]["accuracy"]
    if "compression" in m:
        out["compression_precision"] = m["compression"]["precision"]
    if "distinction" in m:
        out["distinction_precision"] = m["distinction"]["precision"]
        out["distinction_recall"] = m["distinction"]["recall"]
    if "detour" in m:
        for key, value in m["detour"].items():
            out[f"detour_{key}"] = value["success"]
    return {k: float(v) for k, v in out.items() if v is not None}


def format_table(results: dict) -> str:
    """A two-column markdown table of ``headline(results)``."""
    rows = ["| metric | value |", "| --- | --- |"]
    for name, value in headline(results).items():
        text = f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
        rows.append(f"| {name} | {text} |")
    return "\n".join(rows)


def parse_scale_overrides(items: list[str]) -> dict:
    """``["path_pairs=200", "detour_probs=[0.05]"]`` -> a dict; values are JSON, else strings."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_SCALE:
            raise UserError(f"expected --set KEY=VALUE with KEY one of: {', '.join(DEFAULT_SCALE)} (got '{item}')")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if type(out[key]) is not type(DEFAULT_SCALE[key]) and not (
                isinstance(DEFAULT_SCALE[key], float) and isinstance(out[key], int)):
            raise UserError(f"--set {key}: expected {type(DEFAULT_SCALE[key]).__name__} (like "
                            f"{json.dumps(DEFAULT_SCALE[key])}), got {value!r}")
    return out


def run_eval(model_dir: str | Path, world_dir: str | Path, out: str | Path | None = None,
             metrics: list[str] | None = None, scale: dict | str = "default", seed: int = 0,
             device: str = "cpu", overrides: list[str] | None = None) -> dict:
    """``ds-mtp eval``: load an exported model and a world, evaluate, write the JSON results atomically.
    ``overrides`` are ``KEY=VALUE`` changes to the scale (``--set``)."""
    import json

    from ds_mtp.data import write_atomic
    from ds_mtp.experiments.worlds import load_world
    from ds_mtp.model import load_exported
    from ds_mtp.run_dir import resolve_model_dir

    world = load_world(world_dir)
    names = resolve_metrics(metrics)
    sc = {**resolve_scale(scale), **parse_scale_overrides(overrides or [])}
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
    if not Path(model_dir).exists():
        raise UserError(f"model directory not found: {model_dir}")
    model = load_exported(resolve_model_dir(model_dir), device=device)
    if model.cfg.vocab_size != world.vocab_size:
        raise UserError(f"the model's vocabulary ({model.cfg.vocab_size} tokens) does not match the world's "
                        f"({world.vocab_size}): was it trained on {world_dir}?")
    results = evaluate_all(model, world, sc, seed, names)
    results["model_dir"] = str(model_dir)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())
    return results
