"""`world check`: classification of text sequences against a graph."""

from pathlib import Path

import networkx as nx
import pytest

from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds import check_sequences, load_world, make_world

MANHATTAN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "manhattan"


@pytest.fixture
def edges(tmp_path):
    f = tmp_path / "edges.tsv"
    f.write_text("node\tdirection\tneighbor\n10\tE\t20\n20\tW\t10\n20\tN\t30\n30\tS\t20\n")
    return f


def test_each_category_on_hand_written_sequences(tmp_path, edges):
    lines = ["10 30 E N end",        # valid
             "10 20 E end",          # valid
             "10 30 N end",          # illegal turn: 10 has no N edge
             "10 30 E end",          # end at 20, not 30
             "10 30 E N",            # no end
             "10 30 E 20 end",       # a node token where a move is expected
             "10 99 E end",          # unknown destination
             "10 20 E end E",        # tokens after end
             ""]                     # blank lines are skipped
    f = tmp_path / "samples.txt"
    f.write_text("\n".join(lines) + "\n")
    assert check_sequences(edges, "direction", f) == {
        "valid": 2, "illegal_turn": 1, "wrong_end": 1, "unterminated": 1, "invalid_format": 3, "total": 8}


def test_increment_format_against_a_world_directory(tmp_path):
    out = make_world("usg", "shortest", tmp_path / "w", seed=0, n=12)
    world = load_world(out)
    s, t = world.heldout_pairs[0]
    good = world.tokenizer.to_text(world.tokenizer.encode(nx.shortest_path(world.graph.to_networkx(), s, t)))
    f = tmp_path / "inc.txt"
    f.write_text(good + "\n" + good.replace("<eos>", "") + "\n")
    assert check_sequences(out, "increment", f) == {
        "valid": 1, "illegal_turn": 0, "wrong_end": 0, "unterminated": 1, "invalid_format": 0, "total": 2}


def vafa_is_valid(words, adjacency):
    """Vafa et al.'s validity rule, written independently of the package."""
    node, dest = words[0], words[1]
    for word in words[2:]:
        if word == "end":
            return node == dest
        if (node, word) not in adjacency:
            return False
        node = adjacency[(node, word)]
    return False


@pytest.mark.skipif(not (MANHATTAN / "edges.tsv").is_file(), reason="shared Manhattan data not present")
@pytest.mark.parametrize("graph, samples", [("edges.tsv", "samples-random.txt"),
                                            ("edges-shortest.tsv", "samples-shortest.txt")])
def test_manhattan_samples_agree_with_vafas_rule(graph, samples):
    counts = check_sequences(MANHATTAN / graph, "direction", MANHATTAN / samples)
    adjacency = {}
    for line in (MANHATTAN / graph).read_text().splitlines()[1:]:
        u, d, v = line.split()
        adjacency[(u, d)] = v
    lines = [l.split() for l in (MANHATTAN / samples).read_text().splitlines() if l.strip()]
    assert counts["total"] == len(lines) == 6400
    # Vafa's rule also accepts a sequence that continues after `end`; we call that invalid_format
    assert counts["valid"] == sum(vafa_is_valid(w, adjacency) and w[-1] == "end" and w.count("end") == 1
                                  for w in lines)
    assert 0 < counts["illegal_turn"] and 0 < counts["wrong_end"] and counts["valid"] > 0.6 * 6400


def test_bad_inputs_are_user_errors(tmp_path, edges):
    f = tmp_path / "s.txt"
    f.write_text("10 20 E end\n")
    with pytest.raises(UserError, match="unknown format"):
        check_sequences(edges, "compass", f)
    with pytest.raises(UserError, match="not found"):
        check_sequences(tmp_path / "nope.tsv", "direction", f)
    with pytest.raises(UserError, match="sequence file not found"):
        check_sequences(edges, "direction", tmp_path / "nope.txt")
    with pytest.raises(UserError, match="without world.json"):
        check_sequences(tmp_path, "direction", f)
