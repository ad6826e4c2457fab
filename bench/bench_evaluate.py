"""Seconds per metric of ``evaluate_all`` on the paper's USG world (100 nodes) with a paper-sized model.

    OMP_NUM_THREADS=1 python bench/bench_evaluate.py --scale default [--trained MODEL_DIR] [--device cpu]

An untrained paper-graph model (6L/6H/d=120, context 64) is the slow case for the sampling metrics:
it rarely emits end-of-sequence, so every sampled continuation runs to the context limit. The two
reference oracles are timed alongside for scale (they compute states in Python, not a network).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ds_mtp.config import PRESETS, ModelConfig
from ds_mtp.experiments.evaluate.reference_models import LegalUniformOracle
from ds_mtp.experiments.evaluate.suite import evaluate_all, headline
from ds_mtp.model import MTPModel, load_exported
from ds_mtp.experiments.worlds import load_world, make_world


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="default", choices=["quick", "default"])
    parser.add_argument("--world", default="usg")
    parser.add_argument("--trained", help="an exported model trained on --world-dir")
    parser.add_argument("--world-dir", help="an existing world directory (default: make --world in a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-oracle", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    world_dir = args.world_dir or make_world(args.world, "paper", tempfile.mkdtemp(), seed=0)
    world = load_world(world_dir)
    print(f"world {world.name}: {world.graph.num_nodes} nodes, vocab {world.vocab_size}, "
          f"made/loaded in {time.perf_counter() - started:.1f} s", flush=True)
    if args.trained:
        model, label = load_exported(args.trained, device=args.device), f"trained {args.trained}"
    else:
        torch.manual_seed(0)
        cfg = ModelConfig(**{**PRESETS["paper-graph"], "vocab_size": world.vocab_size})
        model, label = MTPModel(cfg).to(args.device).eval(), "untrained paper-graph"
    models = [(label, model)] + ([] if args.skip_oracle else [("LegalUniformOracle", LegalUniformOracle(world))])
    for name, m in models:
        started = time.perf_counter()
        results = evaluate_all(m, world, args.scale, seed=0)
        total = time.perf_counter() - started
        print(f"{name}: {total:.1f} s total; per metric {json.dumps(results['seconds'])}", flush=True)
        print(json.dumps({k: round(v, 4) for k, v in headline(results).items()}), flush=True)


if __name__ == "__main__":
    main()
