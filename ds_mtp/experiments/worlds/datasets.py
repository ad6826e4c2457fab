"""Path datasets on a graph: which walks become training and held-out sequences.

All "shortest" paths are by hop count (every edge has length 1); ties are broken by the search
order (BFS over successors in node order, or networkx's Yen implementation for top-k). Origin /
destination pairs are split into train and held-out *by pair*, so a held-out pair never appears in
training in any form.
"""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np

from ds_mtp.experiments.worlds.graphs import Graph


def bfs_tree(graph: Graph, source: int) -> tuple[np.ndarray, np.ndarray]:
    """(hop distance, BFS parent) from ``source`` to every node; -1 where unreachable."""
    dist = np.full(graph.num_nodes, -1, dtype=np.int64)
    parent = np.full(graph.num_nodes, -1, dtype=np.int64)
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for v in graph.successors(u):
                if dist[v] < 0:
                    dist[v] = dist[u] + 1
                    parent[v] = u
                    nxt.append(v)
        frontier = nxt
    return dist, parent


def path_from_parents(parent: np.ndarray, source: int, target: int) -> list[int]:
    path = [target]
    while path[-1] != source:
        path.append(int(parent[path[-1]]))
    return path[::-1]


def reachable_pairs(graph: Graph) -> list[tuple[int, int]]:
    """Every ordered pair (s, t), s != t, with a path from s to t."""
    pairs = []
    for s in range(graph.num_nodes):
        dist, _ = bfs_tree(graph, s)
        pairs.extend((s, int(t)) for t in np.nonzero(dist > 0)[0])
    return pairs


def sample_pairs(graph: Graph, num_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``num_pairs`` distinct reachable pairs: a uniform origin, then a uniform reachable destination.

    For a strongly connected graph this is uniform over pairs; it is meant for graphs too large to
    enumerate (Manhattan has ~21M pairs).
    """
    pairs: set[tuple[int, int]] = set()
    reach_cache: dict[int, np.ndarray] = {}
    attempts = 0
    while len(pairs) < num_pairs:
        attempts += 1
        if attempts > 20 * num_pairs + 1000:
            raise ValueError(f"could not find {num_pairs} distinct reachable pairs")
        s = int(rng.integers(graph.num_nodes))
        if s not in reach_cache:
            reach_cache[s] = np.nonzero(bfs_tree(graph, s)[0] > 0)[0]
        targets = reach_cache[s]
        if targets.size:
            pairs.add((s, int(targets[rng.integers(targets.size)])))
    return sorted(pairs)


def split_pairs(pairs, heldout_fraction: float, rng: np.random.Generator):
    """Shuffle distinct pairs and keep ``int((1 - heldout_fraction) * len)`` for training, the rest held out (both
    sorted): generate_dataset.py's cut, int(len * train_ratio)."""
    pairs = sorted(set(pairs))
    order = rng.permutation(len(pairs))
    n_held = len(pairs) - int((1 - heldout_fraction) * len(pairs))
    heldout = sorted(pairs[i] for i in order[:n_held])
    train = sorted(pairs[i] for i in order[n_held:])
    return train, heldout


def shortest_paths_by_source(graph: Graph, pairs) -> dict[tuple[int, int], list[int]]:
    """One hop-shortest path per pair, with one BFS per distinct origin."""
    out = {}
    for s, group in itertools.groupby(sorted(pairs), key=lambda p: p[0]):
        _, parent = bfs_tree(graph, s)
        for _, t in group:
            out[(s, t)] = path_from_parents(parent, s, t)
    return out


def top_k_shortest_paths(nx_graph: nx.DiGraph, source: int, target: int, k: int) -> list[list[int]]:
    """The k shortest simple paths by hop count (fewer when fewer exist), shortest first."""
    return [list(p) for p in itertools.islice(nx.shortest_simple_paths(nx_graph, source, target), k)]


def detour_path(nx_graph: nx.DiGraph, path: list[int], rng: np.random.Generator) -> list[int] | None:
    """Shortest path from path[0] to path[-1] avoiding one random intermediate node of ``path``.

    None when the path has fewer than two intermediate nodes (as in the paper's generate_dataset.py, which
    detours only around shortest paths of more than 3 nodes) or the avoided node cuts the target off.
    """
    if len(path) <= 3:
        return None
    avoided = path[1 + int(rng.integers(len(path) - 2))]
    view = nx.restricted_view(nx_graph, [avoided], [])
    try:
        return list(nx.shortest_path(view, path[0], path[-1]))
    except nx.NetworkXNoPath:
        return None


def recovery_path(graph: Graph, source: int, target: int, rng: np.random.Generator,
                  parents_to_target: dict[int, np.ndarray]) -> list[int] | None:
    """One uniformly random first step from ``source``, then a shortest path to ``target``.

    The first step may move away from the target (that is the point: the model learns to recover);
    the result is a legal walk but not necessarily simple. None when the chosen neighbour cannot
    reach the target, or when ``source`` has a single successor (then the step is no wrong turn; the paper's
    generate_dataset.py makes recoveries only from nodes with more than one). ``parents_to_target`` caches,
    per target, each node's next hop towards it.
    """
    successors = graph.successors(source)
    if len(successors) < 2:
        return None
    first = successors[int(rng.integers(len(successors)))]
    if target not in parents_to_target:
        parents_to_target[target] = next_hop_towards(graph, target)
    next_hop = parents_to_target[target]
    walk = [source, first]
    while walk[-1] != target:
        hop = int(next_hop[walk[-1]])
        if hop < 0:
            return None
        walk.append(hop)
    return walk


def next_hop_towards(graph: Graph, target: int) -> np.ndarray:
    """For every node, the first successor (in node order) on a shortest path to ``target``; -1 if none."""
    dist = graph.distances_to(target)
    hop = np.full(graph.num_nodes, -1, dtype=np.int64)
    for u in range(graph.num_nodes):
        if dist[u] > 0:
            hop[u] = next(v for v in graph.successors(u) if dist[v] == dist[u] - 1)
    return hop


def paper_training_paths(graph: Graph, pairs, rng: np.random.Generator, k: int = 3,
                         detour_prob: float = 0.3, recovery_prob: float = 0.3) -> list[tuple[list[int], int]]:
    """The LSE-MTP paper's training set: per pair the k shortest simple paths, plus a detour path
    with probability ``detour_prob`` and a recovery path with probability ``recovery_prob``.

    Returns (walk, target) items; the target is always the walk's last node.
    """
    nx_graph = graph.to_networkx()
    hop_cache: dict[int, np.ndarray] = {}
    out = []
    for s, t in sorted(pairs):
        shortest = top_k_shortest_paths(nx_graph, s, t, k)
        out.extend((p, t) for p in shortest)
        if rng.random() < detour_prob:
            detour = detour_path(nx_graph, shortest[0], rng)
            if detour is not None:
                out.append((detour, t))
        if rng.random() < recovery_prob:
            recovery = recovery_path(graph, s, t, rng, hop_cache)
            if recovery is not None:
                out.append((recovery, t))
    return out


def noisy_shortest_paths(graph: Graph, pairs, rng: np.random.Generator, noise: float = 0.5,
                         paths_per_pair: int = 1) -> list[tuple[list[int], int]]:
    """Shortest paths under randomly perturbed edge lengths.

    Each edge length is ``exp(noise * z)`` with z standard normal, redrawn for every origin and
    every repetition (so the paths of one origin in one repetition share a draw). With noise=0 this
    is a plain (Dijkstra) shortest path.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    us = np.array([u for u, _ in graph.edges], dtype=np.int64)
    vs = np.array([v for _, v in graph.edges], dtype=np.int64)
    out = []
    for _ in range(paths_per_pair):
        for s, group in itertools.groupby(sorted(pairs), key=lambda p: p[0]):
            weights = np.exp(noise * rng.standard_normal(us.size))
            matrix = csr_matrix((weights, (us, vs)), shape=(graph.num_nodes, graph.num_nodes))
            _, parent = dijkstra(matrix, directed=True, indices=s, return_predecessors=True)
            for _, t in group:
                out.append((path_from_parents(parent, s, t), t))
    return out


def random_walks(graph: Graph, num_walks: int, rng: np.random.Generator, min_steps: int = 1,
                 max_steps: int = 100) -> list[list[int]]:
    """Uniform random walks: a uniform origin, then ``L ~ U{min_steps..max_steps}`` uniform steps.

    The destination is where the walk ends. Walks that end at their origin are redrawn (a pair
    with origin == destination would make the destination token carry no information); a walk
    that reaches a node without successors stops there.
    """
    walks = []
    while len(walks) < num_walks:
        walk = [int(rng.integers(graph.num_nodes))]
        for _ in range(int(rng.integers(min_steps, max_steps + 1))):
            successors = graph.successors(walk[-1])
            if not successors:
                break
            walk.append(successors[int(rng.integers(len(successors)))])
        if walk[-1] != walk[0]:
            walks.append(walk)
    return walks
