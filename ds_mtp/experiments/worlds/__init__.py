"""Graph worlds: build a world, write its path datasets as token shards, load it back.

``make_world("usg", "paper", out_dir, seed=0)`` writes the shards (splits ``train`` and
``heldout``, through ``ds_mtp.data.write_documents``) and ``world.json`` (graph, format, vocabulary,
train and held-out pairs, parameters). ``load_world(out_dir)`` returns a ``World`` that the
evaluation code uses as the ground truth.

World names: ``usg`` (params n, density), ``er`` (params n, p), ``edges:PATH`` (an edges file in
the Manhattan format; ``manhattan`` is short for ``edges:../shared/data/manhattan/edges.tsv``
relative to the repository root). Datasets: ``paper``, ``shortest``, ``noisy``, ``random-walks``
(see ``DATASETS`` and docs/worlds.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_mtp.data import has_manifest, write_atomic, write_documents
from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds import datasets as ds
from ds_mtp.experiments.worlds.graphs import Graph, er, from_edges_file, usg
from ds_mtp.experiments.worlds.tokenize import FORMATS, PathTokenizer, make_tokenizer

WORLD_FILE = "world.json"
DATASETS = ("paper", "shortest", "noisy", "random-walks")
MANHATTAN_EDGES = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "manhattan" / "edges.tsv"

# Parameters each dataset accepts, with defaults (the paper's where it has one).
DATASET_PARAMS = {
    "paper": {"k": 3, "detour_prob": 0.3, "recovery_prob": 0.3},
    "shortest": {"k": 1},
    "noisy": {"noise": 0.5, "paths_per_pair": 1},
    "random-walks": {"num_walks": 100_000, "min_steps": 1, "max_steps": 100},
}
COMMON_PARAMS = {"format": None, "heldout_fraction": 0.5, "num_pairs": None}
WORLD_PARAMS = {"usg": {"n": 100, "density": 0.3}, "er": {"n": 100, "p": 0.04}, "edges": {}}


@dataclass
class World:
    """A deterministic graph world with its tokenizer and its train / held-out pairs."""

    name: str
    graph: Graph
    tokenizer: PathTokenizer
    train_pairs: list[tuple[int, int]]
    heldout_pairs: list[tuple[int, int]]
    params: dict = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.tokenizer.format

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def to_json(self) -> dict:
        return {"name": self.name, "format": self.format, "params": self.params,
                "vocab": self.tokenizer.vocab, "graph": self.graph.to_json(),
                "train_pairs": [list(p) for p in self.train_pairs],
                "heldout_pairs": [list(p) for p in self.heldout_pairs]}


def build_graph(world: str, seed: int = 0, **params) -> tuple[str, Graph]:
    """(kind, graph) for a world name; ``params`` are the world's own parameters."""
    if world == "manhattan":
        world = f"edges:{MANHATTAN_EDGES}"
    kind = "edges" if world.startswith("edges:") else world
    if kind not in WORLD_PARAMS:
        raise UserError(f"unknown world '{world}' (expected usg, er, manhattan or edges:PATH)")
    unknown = set(params) - set(WORLD_PARAMS[kind])
    if unknown:
        raise UserError(f"world {kind} has no parameter(s) {', '.join(sorted(unknown))}")
    merged = {**WORLD_PARAMS[kind], **params}
    if kind == "usg":
        return kind, usg(int(merged["n"]), float(merged["density"]), seed)
    if kind == "er":
        return kind, er(int(merged["n"]), float(merged["p"]), seed)
    path = world[len("edges:"):]
    if not path:
        raise UserError("world edges:PATH needs a path")
    return kind, from_edges_file(path)


def parse_params(items: list[str]) -> dict:
    """``["n=50", "density=0.2", "format=direction"]`` -> ``{"n": 50, "density": 0.2, "format": "direction"}``
    (ints, then floats, then ``none`` / strings)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expected a parameter as key=value, got '{item}'")
        for convert in (int, float):
            try:
                params[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            params[key] = None if value.lower() in ("none", "null") else value
    return params


def make_world(world: str, dataset: str, out_dir: str | Path, seed: int = 0, overwrite: bool = True,
               **params) -> Path:
    """Build ``world``, generate ``dataset`` on it, write shards and world.json into ``out_dir``.

    ``params`` mixes world parameters (usg: n, density; er: n, p), dataset parameters (see
    ``DATASET_PARAMS``) and the common ones: ``format`` (increment | direction; default direction
    for labelled graphs, else increment), ``heldout_fraction`` (0.5), ``num_pairs`` (None: every
    reachable pair; required for graphs over 1,000 nodes). Returns ``out_dir``. With
    ``overwrite=False`` a directory that already holds a world is refused (UserError).
    """
    if not overwrite and ((Path(out_dir) / WORLD_FILE).exists() or has_manifest(out_dir)):
        raise UserError(f"{out_dir} already holds a world (pass --force to replace it)")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}' (expected one of: {', '.join(DATASETS)})")
    kind = "edges" if world.startswith("edges:") or world == "manhattan" else world
    world_params = {k: v for k, v in params.items() if k in WORLD_PARAMS.get(kind, {})}
    other = {k: v for k, v in params.items() if k not in world_params}
    unknown = set(other) - set(DATASET_PARAMS[dataset]) - set(COMMON_PARAMS)
    if unknown:
        raise UserError(f"unknown parameter(s) for world {kind} / dataset {dataset}: {', '.join(sorted(unknown))}")
    opts = {**COMMON_PARAMS, **DATASET_PARAMS[dataset], **other}
    kind, graph = build_graph(world, seed, **world_params)
    if not graph.edges:
        raise UserError(f"world {world} has no edges")
    fmt = opts["format"] or ("direction" if graph.labels is not None else "increment")
    if fmt not in FORMATS:
        raise UserError(f"unknown path format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    tokenizer = make_tokenizer(graph, fmt)
    rng = np.random.default_rng([seed, 1])  # the graph used the plain seed; keep the streams apart

    walks_train: list[tuple[list[int], int]]
    walks_heldout: list[tuple[list[int], int]]
    if dataset == "random-walks":
        walks = ds.random_walks(graph, int(opts["num_walks"]), rng, int(opts["min_steps"]), int(opts["max_steps"]))
        train_pairs, heldout_pairs = ds.split_pairs([(w[0], w[-1]) for w in walks], opts["heldout_fraction"], rng)
        held = set(heldout_pairs)
        walks_train = [(w, w[-1]) for w in walks if (w[0], w[-1]) not in held]
        walks_heldout = [(w, w[-1]) for w in walks if (w[0], w[-1]) in held]
    else:
        if opts["num_pairs"] is None:
            if graph.num_nodes > 1000:
                raise UserError(f"a graph of {graph.num_nodes} nodes needs num_pairs (too many pairs to use all)")
            pairs = ds.reachable_pairs(graph)
        else:
            pairs = ds.sample_pairs(graph, int(opts["num_pairs"]), rng)
        train_pairs, heldout_pairs = ds.split_pairs(pairs, opts["heldout_fraction"], rng)
        if dataset == "paper":
            walks_train = ds.paper_training_paths(graph, train_pairs, rng, int(opts["k"]),
                                                  float(opts["detour_prob"]), float(opts["recovery_prob"]))
        elif dataset == "shortest":
            if int(opts["k"]) == 1:
                walks_train = [(p, t) for (_, t), p in ds.shortest_paths_by_source(graph, train_pairs).items()]
            else:
                nx_graph = graph.to_networkx()
                walks_train = [(p, t) for s, t in train_pairs
                               for p in ds.top_k_shortest_paths(nx_graph, s, t, int(opts["k"]))]
        else:
            walks_train = ds.noisy_shortest_paths(graph, train_pairs, rng, float(opts["noise"]),
                                                  int(opts["paths_per_pair"]))
        if dataset == "noisy":
            walks_heldout = ds.noisy_shortest_paths(graph, heldout_pairs, rng, float(opts["noise"]), 1)
        else:
            walks_heldout = [(p, t) for (_, t), p in ds.shortest_paths_by_source(graph, heldout_pairs).items()]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_params = {"world": world, "kind": kind, "dataset": dataset, "seed": seed,
                  **{k: v for k, v in WORLD_PARAMS[kind].items()}, **world_params, **opts, "format": fmt}
    result = World(world, graph, tokenizer, train_pairs, heldout_pairs, all_params)
    # world.json first: the manifest (manifest.json) is written last and marks the directory complete
    write_atomic(out_dir / WORLD_FILE, (json.dumps(result.to_json()) + "\n").encode())
    extra = {"world": {"name": world, "format": fmt, "params": all_params, "vocab": tokenizer.vocab,
                       "world_file": WORLD_FILE, "num_nodes": graph.num_nodes, "num_edges": len(graph.edges),
                       "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs)}}
    write_documents(out_dir, {"train": [tokenizer.encode(w, t) for w, t in walks_train],
                              "heldout": [tokenizer.encode(w, t) for w, t in walks_heldout]},
                    vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids, extra=extra)
    return out_dir


def load_world(out_dir: str | Path) -> World:
    """The World written by ``make_world`` into ``out_dir``."""
    path = Path(out_dir) / WORLD_FILE
    if not path.is_file():
        raise UserError(f"no {WORLD_FILE} in {out_dir}: not a world directory (make one with `ds-mtp world make`)")
    try:
        raw = json.loads(path.read_text())
        graph = Graph.from_json(raw["graph"])
        tokenizer = make_tokenizer(graph, raw["format"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid world file: {e}") from None
    if tokenizer.vocab != raw["vocab"]:
        raise UserError(f"{path}: stored vocabulary does not match the graph (written by another version?)")
    return World(raw["name"], graph, tokenizer, [tuple(p) for p in raw["train_pairs"]],
                 [tuple(p) for p in raw["heldout_pairs"]], raw.get("params", {}))



from ds_mtp.experiments.worlds.check import check_sequences  # noqa: E402  (check needs graphs and tokenize only)

__all__ = ["World", "Graph", "make_world", "parse_params", "load_world", "build_graph", "check_sequences", "usg", "er",
           "from_edges_file", "DATASETS", "FORMATS"]
