"""The LSE-MTP paper's metrics on models built to give known answers."""

import pytest
import torch

from ds_mtp.experiments.evaluate.paper import belief_similarity, illegal_shortcuts, structure_gain
from ds_mtp.experiments.evaluate.reference_models import LegalUniformOracle
from ds_mtp.experiments.worlds import load_world, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_world(make_world("usg", "paper", tmp_path_factory.mktemp("w"), seed=0, n=20))


def test_isp_is_the_probability_of_the_named_shortcut(world):
    tok, n = world.tokenizer, world.graph.num_nodes

    class EveryNode:
        """Uniform over the n-1 steps from the origin to any other node, legal or not."""

        def logits(self, tokens):
            out = torch.full((*tokens.shape, tok.vocab_size), -1e9)
            for b, a in enumerate(tokens[:, 0].tolist()):
                out[b, :, [tok.move_token(a, v) for v in range(n) if v != a]] = 0.0
            return out

    r = illegal_shortcuts(EveryNode(), world, num_triples=300, seed=3)
    assert r["triples"] == 300
    assert r["isp"] == pytest.approx(1 / (n - 1)) and r["mean_legal_move_probability"] == pytest.approx(1 / (n - 1))
    degrees = [len(world.graph.successors(u)) for u in range(n)]
    assert min(degrees) / (n - 1) <= r["legal_step_probability"] <= max(degrees) / (n - 1)
    oracle = illegal_shortcuts(LegalUniformOracle(world), world, num_triples=300, seed=3)
    assert oracle["isp"] == 0.0 and oracle["legal_step_probability"] == pytest.approx(1.0)


def test_isp_is_undefined_in_the_direction_format(tmp_path):
    edges = tmp_path / "edges.tsv"
    # a 3x3 grid of streets, both ways: enough nodes 2-4 hops before a goal
    lines = []
    for x in range(3):
        for y in range(3):
            here = f"{x}{y}"
            for dx, dy, label in ((1, 0, "E"), (-1, 0, "W"), (0, 1, "N"), (0, -1, "S")):
                if 0 <= x + dx < 3 and 0 <= y + dy < 3:
                    lines.append(f"1{here}\t{label}\t1{x + dx}{y + dy}")
    edges.write_text("\n".join(lines) + "\n")
    grid = load_world(make_world(f"edges:{edges}", "shortest", tmp_path / "w"))
    r = illegal_shortcuts(LegalUniformOracle(grid), grid, num_triples=50)
    assert grid.format == "direction" and r["isp"] is None and r["legal_step_probability"] == pytest.approx(1.0)


class LookAhead:
    """A model that cheats: its state at t is the one-hot of token t + k (zero where there is none)."""

    def __init__(self, vocab_size, k):
        self.V, self.k = vocab_size, k

    def hidden(self, tokens):
        h = torch.zeros(*tokens.shape, self.V)
        T = tokens.shape[1]
        h[:, :T - self.k] = torch.nn.functional.one_hot(tokens[:, self.k:], self.V).float()
        return h


def test_structure_gain_sees_shared_k_ahead_tokens(world):
    V = world.vocab_size
    ahead = structure_gain(LookAhead(V, 2), world, ks=(2,), num_sequences=100)
    assert ahead["k2"]["shared_cosine"] == pytest.approx(1.0) and ahead["k2"]["pairs"] > 0
    # the random baseline pairs states with different k-ahead tokens: orthogonal one-hots
    assert ahead["k2"]["random_cosine"] == 0.0 and ahead["k2"]["gain"] == pytest.approx(1.0)
    # states that encode the next token never align on pairs chosen to differ in it
    nxt = structure_gain(LookAhead(V, 1), world, ks=(2, 3), num_sequences=100)
    assert nxt["k2"]["shared_cosine"] == 0.0 and nxt["k3"]["shared_cosine"] == 0.0
    assert nxt["k2"]["gain"] < 0


def test_belief_groups_separate_history_from_state(world):
    V = world.vocab_size

    class OriginOnly:
        """State = one-hot of the origin token: remembers history, ignores the current node."""

        def hidden(self, tokens):
            return torch.nn.functional.one_hot(tokens[:, :1], V).float().expand(*tokens.shape, V)

    for prefixes, read_at in (("reverse_walk", "second_to_last"), ("shortest_path", "last")):
        r = belief_similarity(OriginOnly(), world, num_trials=200, seed=1, prefixes=prefixes, read_at=read_at)
        assert all(r[g]["trials"] == 200 for g in ("same_node_same_goal", "diff_node_diff_goal"))
        # two different prefixes of one state mostly start at different origins: poor compression
        assert r["compression"] < 0.7
    oracle = belief_similarity(LegalUniformOracle(world), world, num_trials=200, seed=1, prefixes="shortest_path",
                               read_at="last")
    assert oracle["compression"] == pytest.approx(1.0) and oracle["goal_distinction"] == pytest.approx(0.5)
    # the prompt-and-one-move prefixes fit a short context
    short = belief_similarity(LegalUniformOracle(world), world, num_trials=50, max_len=5, prefixes="shortest_path")
    assert short["same_node_same_goal"]["trials"] > 0


def test_belief_reads_the_official_position_by_default(world):
    oracle = LegalUniformOracle(world)
    official = belief_similarity(oracle, world, num_trials=200, seed=1)
    assert official["prefixes"] == "reverse_walk" and official["read_at"] == "second_to_last"
    # one token before the end the two walks into a node are usually at different predecessors: below 1
    assert 0.5 <= official["compression"] < 1.0
    from ds_mtp.errors import UserError
    with pytest.raises(UserError, match="read_at"):
        belief_similarity(oracle, world, num_trials=5, read_at="first")
    with pytest.raises(UserError, match="prefixes"):
        belief_similarity(oracle, world, num_trials=5, prefixes="random")
