"""Graph construction for the world-model suite.

Every world is a directed graph on nodes ``0 .. n-1`` (``Graph``). Synthetic worlds (``usg``,
``er``) use their ids directly as node names; a graph read from an edges file (the Manhattan street
graph of Vafa et al.) keeps its original ids (OpenStreetMap ids) as names and the compass label of
each edge, so it can be written in Vafa's direction format as well as in the increment format.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np

from ds_mtp.errors import UserError


@dataclass
class Graph:
    """A directed graph on nodes 0..num_nodes-1.

    ``edges`` are directed (u, v) pairs, sorted. ``names`` are the node names used as tokens
    ("0".."n-1" for synthetic graphs, OSM ids for Manhattan). ``labels`` maps an edge to its
    direction label when the graph has them (at most one out-edge per label per node).
    ``positions`` are 2-D coordinates when the graph has them (USG).
    """

    num_nodes: int
    edges: list[tuple[int, int]]
    names: list[str] = field(default_factory=list)
    labels: dict[tuple[int, int], str] | None = None
    positions: list[tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        self.edges = sorted({(int(u), int(v)) for u, v in self.edges})
        if not self.names:
            self.names = [str(i) for i in range(self.num_nodes)]
        self._succ: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for u, v in self.edges:
            self._succ[u].append(v)
        self._edge_set = set(self.edges)

    def successors(self, u: int) -> list[int]:
        return self._succ[u]

    def has_edge(self, u: int, v: int) -> bool:
        return (u, v) in self._edge_set

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(range(self.num_nodes))
        g.add_edges_from(self.edges)
        return g

    def distances_to(self, target: int) -> np.ndarray:
        """Hop distance from every node to ``target`` (-1 where unreachable), by reverse BFS."""
        if not hasattr(self, "_pred"):
            self._pred = [[] for _ in range(self.num_nodes)]
            for u, v in self.edges:
                self._pred[v].append(u)
        dist = np.full(self.num_nodes, -1, dtype=np.int64)
        dist[target] = 0
        frontier = [target]
        while frontier:
            nxt = []
            for v in frontier:
                for u in self._pred[v]:
                    if dist[u] < 0:
                        dist[u] = dist[v] + 1
                        nxt.append(u)
            frontier = nxt
        return dist

    def predecessors(self, v: int) -> list[int]:
        if not hasattr(self, "_pred"):
            self.distances_to(v)
        return self._pred[v]

    def to_json(self) -> dict:
        out = {"num_nodes": self.num_nodes, "edges": [list(e) for e in self.edges], "names": self.names}
        if self.labels is not None:
            out["labels"] = [self.labels[e] for e in self.edges]
        if self.positions is not None:
            out["positions"] = [list(p) for p in self.positions]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Graph":
        edges = [tuple(e) for e in d["edges"]]
        labels = dict(zip(edges, d["labels"])) if "labels" in d else None
        positions = [tuple(p) for p in d["positions"]] if "positions" in d else None
        return cls(d["num_nodes"], edges, list(d["names"]), labels, positions)


def usg(n: int = 100, density: float = 0.3, seed: int = 0) -> Graph:
    """The paper's undirected spatial graph, with every edge in both directions.

    ``n`` uniform points in the unit square are Delaunay-triangulated; the graph is the Euclidean
    minimum spanning tree of the triangulation plus a random ``density`` fraction of the remaining
    Delaunay edges, the count truncated as the paper's generate_dataset.py does (int(density × remaining)).
    Node ids are assigned in (x, y) order so that nearby ids tend to be nearby points.
    """
    from scipy.spatial import Delaunay

    if n < 3:
        raise UserError(f"usg needs at least 3 nodes (got n={n})")
    if not 0.0 <= density <= 1.0:
        raise UserError(f"usg density must be in [0, 1] (got {density})")
    rng = np.random.default_rng(seed)
    points = rng.random((n, 2))
    order = np.lexsort((points[:, 1], points[:, 0]))  # sort by x, then y
    points = points[order]
    undirected = set()
    for simplex in Delaunay(points).simplices:
        for a, b in itertools.combinations(sorted(int(i) for i in simplex), 2):
            undirected.add((a, b))
    weighted = nx.Graph()
    weighted.add_weighted_edges_from(
        (a, b, float(np.linalg.norm(points[a] - points[b]))) for a, b in sorted(undirected))
    tree = {tuple(sorted(e)) for e in nx.minimum_spanning_edges(weighted, algorithm="kruskal", data=False)}
    remaining = sorted(undirected - tree)
    chosen = rng.choice(len(remaining), size=int(density * len(remaining)), replace=False)
    kept = tree | {remaining[i] for i in chosen}
    edges = [(a, b) for a, b in kept] + [(b, a) for a, b in kept]
    return Graph(n, edges, positions=[(float(x), float(y)) for x, y in points])


def er(n: int = 100, p: float = 0.04, seed: int = 0) -> Graph:
    """Directed Erdős–Rényi G(n, p): each ordered pair (u, v), u != v, is an edge with probability p."""
    if n < 2:
        raise UserError(f"er needs at least 2 nodes (got n={n})")
    if not 0.0 <= p <= 1.0:
        raise UserError(f"er edge probability must be in [0, 1] (got {p})")
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n)) < p
    np.fill_diagonal(mask, False)
    us, vs = np.nonzero(mask)
    return Graph(n, list(zip(us.tolist(), vs.tolist())))


def utf8_lines(path: Path):
    """(line number, line) over a text file, refusing bytes that are not UTF-8 in one line that names the line
    (the platform's default encoding would decide otherwise, and a decode error is a traceback)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None


def from_edges_file(path: str | Path) -> Graph:
    """Read a graph in the Manhattan format: tab-separated ``node direction neighbor`` lines.

    An optional header line ``node direction neighbor`` is skipped. Nodes are numbered 0..n-1 in
    the numeric order of their ids when all ids are integers (else in string order); the original
    ids become the node names.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"edges file not found: {path}")
    triples = []
    for lineno, line in utf8_lines(path):
        fields = line.split()
        if not fields:
            continue
        if lineno == 1 and fields == ["node", "direction", "neighbor"]:
            continue
        if len(fields) != 3:
            raise UserError(f"{path}:{lineno}: expected 'node<TAB>direction<TAB>neighbor', got {line.strip()!r}")
        triples.append(tuple(fields))
    if not triples:
        raise UserError(f"edges file {path} has no edges")
    ids = {t[0] for t in triples} | {t[2] for t in triples}
    key = (lambda s: (int(s), s)) if all(s.lstrip("-").isdigit() for s in ids) else (lambda s: (0, s))
    names = sorted(ids, key=key)
    index = {name: i for i, name in enumerate(names)}
    labels: dict[tuple[int, int], str] = {}
    seen_labels: set[tuple[int, str]] = set()
    for lineno, (u_name, label, v_name) in enumerate(triples, 1):
        u, v = index[u_name], index[v_name]
        if (u, label) in seen_labels:
            raise UserError(f"{path}: node {u_name} has two out-edges labelled {label}")
        if (u, v) in labels:
            raise UserError(f"{path}: edge {u_name} -> {v_name} appears twice")
        seen_labels.add((u, label))
        labels[(u, v)] = label
    return Graph(len(names), list(labels), names, labels)
