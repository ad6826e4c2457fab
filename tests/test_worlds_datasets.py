"""Path datasets and make_world / load_world: legality, splits, the paper's augmentations, shards."""

import json

import networkx as nx
import numpy as np
import pytest

from ds_mtp.data import TokenShards, WindowSampler, read_meta
from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds import load_world, make_world
from ds_mtp.experiments.worlds import datasets as ds
from ds_mtp.experiments.worlds.graphs import Graph, usg


@pytest.fixture(scope="module")
def usg_world(tmp_path_factory):
    out = make_world("usg", "paper", tmp_path_factory.mktemp("usg"), seed=3, n=40)
    return out, load_world(out)


def documents(out, split):
    shards = TokenShards(out, split)
    return [shards.document(i).tolist() for i in range(shards.num_documents)]


def test_world_file_and_meta(usg_world):
    out, world = usg_world
    meta = read_meta(out)
    assert meta.vocab_size == world.vocab_size == 40 + 78 + 2
    assert meta.special_ids["eos"] == world.tokenizer.eos_id and meta.special_ids["pad"] == world.tokenizer.pad_id
    info = meta.extra["world"]
    assert info["vocab"] == world.tokenizer.vocab and info["params"]["n"] == 40 and info["params"]["density"] == 0.3
    assert world.graph.edges == usg(40, 0.3, 3).edges
    assert json.loads((out / "world.json").read_text())["format"] == "increment"


def test_pairs_split_half_and_half_by_pair(usg_world):
    _, world = usg_world
    train, held = set(world.train_pairs), set(world.heldout_pairs)
    assert not train & held
    assert train | held == {(s, t) for s in range(40) for t in range(40) if s != t}  # USG is connected
    assert abs(len(train) - len(held)) <= 1


def test_every_training_path_is_legal_and_pairs_stay_in_their_split(usg_world):
    out, world = usg_world
    train_pairs = set(world.train_pairs)
    for doc in documents(out, "train"):
        src, tgt, walk = world.tokenizer.decode(doc)
        assert walk[0] == src and walk[-1] == tgt and (src, tgt) in train_pairs


def test_training_set_holds_top3_plus_detours_and_recoveries(usg_world):
    out, world = usg_world
    g = world.graph.to_networkx()
    by_pair: dict = {}
    for doc in documents(out, "train"):
        src, tgt, walk = world.tokenizer.decode(doc)
        by_pair.setdefault((src, tgt), []).append(walk)
    extra = 0
    for (s, t), walks in by_pair.items():
        top = ds.top_k_shortest_paths(g, s, t, 3)
        assert walks[:len(top)] == top
        extra += len(walks) - len(top)
    # detours (p = 0.3, a few impossible) + recoveries (p = 0.3): about 0.6 per pair
    assert 0.45 < extra / len(by_pair) < 0.65


def test_heldout_is_one_shortest_path_per_pair(usg_world):
    out, world = usg_world
    docs = documents(out, "heldout")
    assert len(docs) == len(world.heldout_pairs)
    for doc, pair in zip(docs, world.heldout_pairs):
        src, tgt, walk = world.tokenizer.decode(doc)
        assert (src, tgt) == pair
        assert len(walk) - 1 == world.graph.distances_to(tgt)[src]


def test_shards_round_trip_through_the_document_sampler(usg_world):
    out, world = usg_world
    shards = TokenShards(out, "train")
    sampler = WindowSampler(shards, seq_len=24, micro_batch=8, seed=0, mode="document")
    batch = sampler.batch(0).tokens
    for row, i in zip(batch.tolist(), sampler.sample_ids(0)):
        doc = shards.document(int(i)).tolist()
        assert row[:len(doc)] == doc and set(row[len(doc):]) <= {world.tokenizer.pad_id}


def test_detour_avoids_an_intermediate_node_and_is_shortest_without_it():
    graph = usg(40, 0.3, 5)
    g = graph.to_networkx()
    rng = np.random.default_rng(0)
    checked = 0
    for s, t in [(0, 39), (3, 30), (10, 25), (1, 20)]:
        path = nx.shortest_path(g, s, t)
        detour = ds.detour_path(g, path, rng)
        if detour is None:
            continue
        avoided = [v for v in path[1:-1] if v not in detour]
        assert avoided, "a detour skips at least one node of the shortest path"
        assert any(len(detour) - 1 == nx.shortest_path_length(nx.restricted_view(g, [v], []), s, t)
                   for v in avoided)
        assert all(g.has_edge(u, v) for u, v in zip(detour, detour[1:]))
        checked += 1
    assert checked >= 3
    assert ds.detour_path(g, [0, 1], rng) is None
    # generate_dataset.py detours only when the shortest path has more than 3 nodes (len(shortest) > 3)
    middle = next(v for v in g.successors(0) if any(g.has_edge(v, w) and w != 0 for w in g.successors(v)))
    end = next(w for w in g.successors(middle) if w != 0)
    assert ds.detour_path(g, [0, middle, end], rng) is None


def test_recovery_takes_a_random_first_step_then_a_shortest_path():
    graph = usg(40, 0.3, 5)
    rng = np.random.default_rng(1)
    cache: dict = {}
    firsts = set()
    for _ in range(50):
        walk = ds.recovery_path(graph, 0, 39, rng, cache)
        assert walk[0] == 0 and walk[-1] == 39 and walk[1] in graph.successors(0)
        assert len(walk) - 2 == graph.distances_to(39)[walk[1]]
        firsts.add(walk[1])
    assert firsts == set(graph.successors(0))
    # generate_dataset.py makes a recovery only from a node with more than one successor
    line = Graph(3, [(0, 1), (1, 0), (1, 2), (2, 1)])
    assert ds.recovery_path(line, 0, 2, rng, {}) is None
    assert ds.recovery_path(line, 1, 2, rng, {}) in ([1, 2, 1, 2], [1, 0, 1, 2])


def test_other_datasets(tmp_path):
    for dataset, params in [("shortest", {}), ("shortest", {"k": 2}), ("noisy", {"noise": 1.0}),
                            ("random-walks", {"num_walks": 300, "max_steps": 12})]:
        out = make_world("er", dataset, tmp_path / f"{dataset}{len(params)}", seed=1, n=30, p=0.1, **params)
        world = load_world(out)
        held = set(world.heldout_pairs)
        for split in ("train", "heldout"):
            for doc in documents(out, split):
                src, tgt, walk = world.tokenizer.decode(doc)
                assert ((src, tgt) in held) == (split == "heldout")
                if dataset == "random-walks":
                    assert 1 <= len(walk) - 1 <= 12
                if dataset == "shortest" and (split == "heldout" or "k" not in params):
                    assert len(walk) - 1 == world.graph.distances_to(tgt)[src]


def test_noisy_paths_with_zero_noise_are_shortest():
    graph = usg(30, 0.3, 2)
    pairs = [(0, 29), (5, 17), (5, 20)]
    for walk, t in ds.noisy_shortest_paths(graph, pairs, np.random.default_rng(0), noise=0.0):
        assert len(walk) - 1 == graph.distances_to(t)[walk[0]]


def test_make_world_is_deterministic(tmp_path):
    a = make_world("usg", "paper", tmp_path / "a", seed=4, n=25)
    b = make_world("usg", "paper", tmp_path / "b", seed=4, n=25)
    assert documents(a, "train") == documents(b, "train")
    assert read_meta(a).splits == read_meta(b).splits


def test_bad_requests_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        make_world("usg", "tours", tmp_path)
    with pytest.raises(UserError, match="unknown world"):
        make_world("grid", "paper", tmp_path)
    with pytest.raises(UserError, match="unknown parameter"):
        make_world("usg", "paper", tmp_path, noise=1.0)
    with pytest.raises(UserError, match="not a world directory"):
        load_world(tmp_path / "nowhere")
