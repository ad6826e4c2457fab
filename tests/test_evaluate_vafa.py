"""Vafa et al.'s metrics: the Myhill-Nerode boundary, prefix and suffix samplers, detours, the probe."""

import itertools

import numpy as np
import pytest
import torch

from ds_mtp.experiments.evaluate.common import WorldIndex, suffix_valid, walk_nodes
from ds_mtp.experiments.evaluate.reference_models import LegalUniformOracle, ShortestPathOracle, UniformModel
from ds_mtp.experiments.evaluate.vafa import (compression_precision, detour_robustness, distinction, sample_continuations,
                                  sample_suffixes,
                                  state_probe, true_boundary)
from ds_mtp.experiments.worlds import World, load_world, make_world
from ds_mtp.experiments.worlds.graphs import Graph
from ds_mtp.experiments.worlds.tokenize import IncrementTokenizer


@pytest.fixture(scope="module")
def small_world():
    # a directed 4-cycle with one chord and one back edge: states differ in their futures
    g = Graph(4, [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (2, 1)])
    tok = IncrementTokenizer(g)
    pairs = [(s, t) for s in range(4) for t in range(4) if s != t]
    return World("small", g, tok, pairs[:6], pairs[6:])


@pytest.fixture(scope="module")
def usg_world(tmp_path_factory):
    return load_world(make_world("usg", "paper", tmp_path_factory.mktemp("w"), seed=1, n=16))


def brute_force_boundary(tok, s1, s2, length):
    """Vafa's get_true_mn_boundary by enumerating every token sequence of the given length."""
    alphabet = list(range(tok.first_move, tok.eos_id + 1))
    boundary = set()
    for seq in itertools.product(alphabet, repeat=length):
        if suffix_valid(tok, *s1, seq) and not suffix_valid(tok, *s2, seq):
            for i in range(1, length + 1):
                if not suffix_valid(tok, *s2, seq[:i]):
                    boundary.add(seq[:i])
                    break
    return sorted(boundary)


@pytest.mark.parametrize("s1,s2", [((0, 3), (2, 3)), ((0, 3), (0, 1)), ((1, 1), (1, 2)), ((2, 0), (3, 1))])
def test_true_boundary_matches_brute_force(small_world, s1, s2):
    tok = small_world.tokenizer
    for length in (1, 3, 4):
        assert true_boundary(tok, s1, s2, length) == brute_force_boundary(tok, s1, s2, length)
    assert true_boundary(tok, s1, s1, 4) == []


def test_backward_prefixes_are_legal_walks_to_the_state(usg_world):
    index, tok = WorldIndex(usg_world), usg_world.tokenizer
    rng = np.random.default_rng(0)
    made = 0
    for u, g in usg_world.heldout_pairs[:30]:
        for moves in (1, 4):
            prefix = index.backward_prefix(u, g, moves, rng)
            if prefix is None:
                continue
            made += 1
            nodes = walk_nodes(tok, prefix)
            assert len(prefix) == 2 + moves and prefix[1] == g and nodes[-1] == u
            assert min(nodes[1:]) >= 0 and g not in nodes[1:]
        shortest = index.shortest_prefix(u, g, rng, max_moves=10)
        if shortest is not None:
            nodes = walk_nodes(tok, shortest)
            dist = usg_world.graph.distances_to(g)
            assert nodes[-1] == u and len(shortest) >= 3
            # a prefix of a shortest path: each move brings the walk one hop closer to g
            assert all(dist[a] == dist[b] + 1 for a, b in zip(nodes[1:], nodes[2:]))
    assert made > 30


def test_epsilon_cutoff_never_samples_rare_tokens(usg_world):
    V, tok = usg_world.vocab_size, usg_world.tokenizer

    class Skewed:
        def logits(self, tokens):
            probs = torch.full((V,), 0.004 / (V - 3))
            probs[tok.first_move] = 0.5
            probs[tok.first_move + 1] = 0.496
            probs[tok.eos_id] = 0.004 - 0.004 / (V - 3)
            return probs.log().expand(*tokens.shape, V).clone()

    gen = torch.Generator().manual_seed(0)
    suffixes = sample_suffixes(Skewed(), [0, 1], usg_world, num=40, max_len=12, epsilon=0.01, generator=gen)
    seen = {t for s in suffixes for t in s}
    assert seen == {tok.first_move, tok.first_move + 1}  # both common tokens, never EOS or the rest
    assert all(len(s) == 10 for s in suffixes)  # no end token: each runs to the length limit


def test_shortest_path_oracle_is_precise_but_not_complete(usg_world):
    # it puts all mass on one move, so it rejects valid continuations: recall < 1; what it rejects
    # after the s2 prefix is still mostly truly invalid there
    result = distinction(ShortestPathOracle(usg_world), usg_world, num_trials=15, seed=2, max_len=40)
    assert result["trials"] > 0 and result["recall"] < 1.0
    legal = distinction(LegalUniformOracle(usg_world), usg_world, num_trials=15, seed=2, max_len=40)
    assert legal["precision"] == 1.0 and legal["recall"] == 1.0


def test_compression_fails_for_a_model_that_remembers_history(usg_world):
    oracle = LegalUniformOracle(usg_world)

    class OriginObsessed:
        """Legal-uniform, but refuses (probability 0) every move at an even origin: two prefixes
        of one state with origins of different parity disagree."""

        def logits(self, tokens):
            out = oracle.logits(tokens)
            even = tokens[:, 0] % 2 == 0
            out[even, :, usg_world.tokenizer.first_move:usg_world.tokenizer.eos_id] = -1e9
            return out

    assert compression_precision(oracle, usg_world, num_trials=10, num_suffixes=5, max_len=40)["precision"] == 1.0
    broken = compression_precision(OriginObsessed(), usg_world, num_trials=20, num_suffixes=5, max_len=40)
    assert broken["precision"] < 1.0


def test_detour_types_and_budget(usg_world):
    for kind in ("random_valid", "least_likely", "second_most_likely"):
        r = detour_robustness(ShortestPathOracle(usg_world), usg_world, 1.0, kind, num_trials=20, max_len=40)
        assert r["success"] == 1.0 and r["detours"] > 0
    # a budget too short for the pair's route: greedy cannot finish
    far = detour_robustness(ShortestPathOracle(usg_world), usg_world, 0.0, num_trials=60, max_len=4)
    assert far["success"] < 1.0
    assert detour_robustness(UniformModel(usg_world.vocab_size), usg_world, 0.1, num_trials=20)["success"] == 0.0
    with pytest.raises(ValueError, match="detour type"):
        detour_robustness(UniformModel(usg_world.vocab_size), usg_world, 0.1, "sideways")


def test_probe_reads_the_node_from_a_one_hot_state_only(usg_world):
    assert state_probe(LegalUniformOracle(usg_world), usg_world, num_sequences=80, epochs=30)["accuracy"] == 1.0
    # the uniform model's state is the embedding of the last token: an increment does not name the node
    noisy = state_probe(UniformModel(usg_world.vocab_size), usg_world, num_sequences=80, epochs=30)
    assert noisy["accuracy"] < 0.6


def test_continuations_of_prefixes_of_different_lengths_are_decoded_together(usg_world):
    # the shortest-path oracle is deterministic: each continuation is the rest of a shortest path
    index, tok = WorldIndex(usg_world), usg_world.tokenizer
    rng = np.random.default_rng(4)
    prefixes = [p for u, g in usg_world.heldout_pairs[:40] for p in [index.backward_prefix(u, g, 1 + u % 4, rng)]
                if p is not None]
    assert len({len(p) for p in prefixes}) > 2
    gen = torch.Generator().manual_seed(0)
    conts = sample_continuations(ShortestPathOracle(usg_world), prefixes, usg_world, 40, 0.01, gen, batch_size=7)
    for prefix, cont in zip(prefixes, conts):
        node, goal = walk_nodes(tok, prefix)[-1], prefix[1]
        assert suffix_valid(tok, node, goal, cont) and cont[-1] == tok.eos_id
        assert len(cont) == usg_world.graph.distances_to(goal)[node] + 1
    # rows that hit the length limit stop there
    short = sample_continuations(UniformModel(usg_world.vocab_size), prefixes, usg_world, 9, 0.5, gen)
    assert all(len(p) + len(c) <= 9 for p, c in zip(prefixes, short))
    assert any(len(p) + len(c) == 9 for p, c in zip(prefixes, short))


def test_backward_prefixes_are_uniform_over_walks_that_avoid_the_goal(usg_world):
    index, moves = WorldIndex(usg_world), 3

    def walks(node, left, goal):  # every backward walk from node that never visits the goal
        if left == 0:
            return [[node]]
        return [[node] + w for p in index.predecessors[node] if p != goal for w in walks(p, left - 1, goal)]

    u, goal = next((u, g) for u, g in usg_world.heldout_pairs if 8 <= len(walks(u, moves, g)) <= 30)
    expected = {tuple(w[::-1]) for w in walks(u, moves, goal)}
    rng = np.random.default_rng(0)
    seen: dict[tuple, int] = {}
    draws = 200 * len(expected)
    for _ in range(draws):
        nodes = walk_nodes(usg_world.tokenizer, index.backward_prefix(u, goal, moves, rng))
        seen[tuple(nodes[1:])] = seen.get(tuple(nodes[1:]), 0) + 1
    assert set(seen) == expected
    assert all(abs(c - 200) < 5 * np.sqrt(200) for c in seen.values())
    assert index.prefix_lengths(u, goal, 5) == {m for m in range(1, 6) if walks(u, m, goal)}


def test_sparse_directed_worlds_still_get_trials(tmp_path):
    # in a sparse ER graph, unconditioned backward walks nearly always hit a source or the goal
    world = load_world(make_world("er", "shortest", tmp_path / "er", n=30, p=0.08))
    oracle = LegalUniformOracle(world)
    comp = compression_precision(oracle, world, num_trials=12, num_suffixes=4, max_len=48)
    dist = distinction(oracle, world, num_trials=12, num_suffixes=3, max_len=48)
    assert comp["trials"] >= 6 and comp["precision"] == 1.0
    assert dist["trials"] >= 6 and dist["precision"] == 1.0 and dist["recall"] == 1.0
