"""The increment and direction tokenizations: layout, round trips, legality."""

import pytest

from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds.datasets import shortest_paths_by_source
from ds_mtp.experiments.worlds.graphs import Graph, usg
from ds_mtp.experiments.worlds.tokenize import DirectionTokenizer, IncrementTokenizer, make_tokenizer


def test_increment_vocabulary_layout():
    g = usg(20, 0.3, 0)
    tok = IncrementTokenizer(g)
    assert tok.vocab[:20] == [str(i) for i in range(20)]
    assert tok.vocab[20:20 + 38] == [f"inc_{d}" for d in list(range(-19, 0)) + list(range(1, 20))]
    assert tok.vocab[-2:] == ["<eos>", "<pad>"] and tok.vocab_size == 20 + 38 + 2
    assert tok.special_ids == {"pad": 59, "eos": 58, "bos": None, "unk": None}
    for u in range(20):
        for v in range(20):
            if u != v:
                assert tok.vocab[tok.move_token(u, v)] == f"inc_{v - u}"


def test_increment_round_trip_and_text():
    g = usg(30, 0.3, 1)
    tok = IncrementTokenizer(g)
    paths = shortest_paths_by_source(g, [(s, t) for s in range(30) for t in range(30) if s != t])
    for (s, t), path in paths.items():
        tokens = tok.encode(path)
        assert tokens[:2] == [s, t] and tokens[-1] == tok.eos_id and len(tokens) == len(path) + 2
        assert tok.decode(tokens) == (s, t, path)
        assert tok.from_text(tok.to_text(tokens)) == tokens
    text = tok.to_text(tok.encode(paths[(0, 29)]))
    nodes = [int(x) for x in text.split()[:1]]
    for word in text.split()[2:-1]:
        nodes.append(nodes[-1] + int(word[len("inc_"):]))
    assert nodes == paths[(0, 29)]


def test_encode_rejects_non_edges_and_decode_rejects_bad_sequences():
    g = Graph(3, [(0, 1), (1, 2)])
    tok = IncrementTokenizer(g)
    with pytest.raises(ValueError):
        tok.encode([0, 2])
    with pytest.raises(ValueError, match="not a legal move"):
        tok.decode([0, 2, tok.move_token(0, 2), tok.eos_id])
    with pytest.raises(ValueError, match="away from the destination"):
        tok.decode([0, 2, tok.move_token(0, 1), tok.eos_id])
    with pytest.raises(ValueError, match="no end"):
        tok.decode([0, 2, tok.move_token(0, 1), tok.move_token(1, 2)])
    assert tok.legal_next(2, 2) == [tok.eos_id] and tok.legal_next(0, 2) == [tok.move_token(0, 1)]


def test_direction_format():
    labels = {(0, 1): "E", (1, 0): "W", (1, 2): "N", (2, 0): "SW"}
    g = Graph(3, list(labels), ["a", "b", "c"], labels)
    tok = DirectionTokenizer(g)
    assert tok.vocab == ["a", "b", "c", "N", "E", "SW", "W", "end", "<pad>"]
    tokens = tok.encode([0, 1, 2, 0, 1], target=1)
    assert tok.to_text(tokens) == "a b E N SW E end"
    assert tok.decode(tokens) == (0, 1, [0, 1, 2, 0, 1])
    assert tok.move_token(0, 2) is None and tok.step(0, tok.token_id["N"]) is None


def test_direction_needs_labels_and_formats_are_checked():
    with pytest.raises(UserError, match="direction labels"):
        make_tokenizer(usg(10, 0.3, 0), "direction")
    with pytest.raises(UserError, match="unknown path format"):
        make_tokenizer(usg(10, 0.3, 0), "compass")
