"""Graph construction: the USG and ER worlds and the edges-file reader."""

import itertools

import networkx as nx
import numpy as np
import pytest
from scipy.spatial import Delaunay

from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds import build_graph
from ds_mtp.experiments.worlds.graphs import er, from_edges_file, usg


def delaunay_and_mst(positions):
    points = np.asarray(positions)
    undirected = set()
    for simplex in Delaunay(points).simplices:
        for a, b in itertools.combinations(sorted(int(i) for i in simplex), 2):
            undirected.add((a, b))
    g = nx.Graph()
    g.add_weighted_edges_from((a, b, float(np.linalg.norm(points[a] - points[b]))) for a, b in undirected)
    mst = {tuple(sorted(e)) for e in nx.minimum_spanning_tree(g).edges()}
    return undirected, mst


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_usg_is_the_papers_graph(seed):
    g = usg(100, 0.3, seed)
    assert g.num_nodes == 100 and len(g.positions) == 100
    assert all(g.has_edge(v, u) for u, v in g.edges), "every edge must exist in both directions"
    assert nx.is_strongly_connected(g.to_networkx())
    assert g.positions == sorted(g.positions), "node ids are assigned in (x, y) order"
    delaunay, mst = delaunay_and_mst(g.positions)
    undirected = {(u, v) for u, v in g.edges if u < v}
    assert mst <= undirected <= delaunay
    extra, available = len(undirected - mst), len(delaunay - mst)
    assert extra == int(0.3 * available)


def test_usg_truncates_the_extra_edge_count_like_the_papers_code():
    """generate_dataset.py adds the first int(len(non_mst_edges) * p_density) shuffled edges: truncated, not
    rounded. A density whose product has fraction .7 tells the two apart."""
    full = usg(60, 1.0, 3)
    delaunay, mst = delaunay_and_mst(full.positions)
    available = len(delaunay - mst)
    g = usg(60, 10.7 / available, 3)
    assert len({(u, v) for u, v in g.edges if u < v} - mst) == 10


def test_usg_deterministic_per_seed():
    assert usg(50, 0.3, 7).edges == usg(50, 0.3, 7).edges
    assert usg(50, 0.3, 7).edges != usg(50, 0.3, 8).edges


def test_usg_density_extremes_give_tree_and_delaunay():
    tree = usg(40, 0.0, 3)
    assert len(tree.edges) == 2 * 39
    full = usg(40, 1.0, 3)
    delaunay, _ = delaunay_and_mst(full.positions)
    assert len(full.edges) == 2 * len(delaunay)


def test_er_edge_count_and_no_self_loops():
    g = er(100, 0.04, 0)
    assert all(u != v for u, v in g.edges)
    assert abs(len(g.edges) - 0.04 * 100 * 99) < 4 * np.sqrt(0.04 * 0.96 * 9900)
    assert not all(g.has_edge(v, u) for u, v in g.edges), "G(n, p) is directed"
    assert er(100, 0.04, 0).edges == g.edges


def write_edges(path, lines, header=True):
    path.write_text(("node\tdirection\tneighbor\n" if header else "") + "".join(l + "\n" for l in lines))
    return path


def test_edges_file_keeps_names_labels_and_numeric_order(tmp_path):
    f = write_edges(tmp_path / "e.tsv", ["100\tN\t20", "20\tS\t100", "20\tE\t3", "3\tW\t20"])
    g = from_edges_file(f)
    assert g.names == ["3", "20", "100"]
    assert g.edges == [(0, 1), (1, 0), (1, 2), (2, 1)]
    assert g.labels[(2, 1)] == "N" and g.labels[(1, 0)] == "E"


@pytest.mark.parametrize("lines, message", [
    (["1\tN\t2\textra"], "expected"),
    (["1\tN\t2", "1\tN\t3"], "two out-edges"),
    (["1\tN\t2", "1\tS\t2"], "appears twice"),
])
def test_edges_file_bad_lines_are_user_errors(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        from_edges_file(write_edges(tmp_path / "e.tsv", lines))


def test_bad_world_names_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown world"):
        build_graph("torus")
    with pytest.raises(UserError, match="not found"):
        build_graph(f"edges:{tmp_path / 'missing.tsv'}")
    with pytest.raises(UserError, match="no parameter"):
        build_graph("usg", p=0.1)
