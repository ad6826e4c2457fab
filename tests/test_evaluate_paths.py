"""Decoding metrics against models whose outcomes are known: oracles and the uniform model."""

import numpy as np
import pytest
import torch

from ds_mtp.experiments.evaluate.paths import decode_pairs, evaluate_paths
from ds_mtp.experiments.evaluate.reference_models import LegalUniformOracle, ShortestPathOracle, UniformModel
from ds_mtp.experiments.worlds import load_world, make_world
from ds_mtp.experiments.worlds.graphs import Graph


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_world(make_world("usg", "paper", tmp_path_factory.mktemp("w"), seed=0, n=20))


def test_oracles_give_legal_next_token_distributions(world):
    tok = world.tokenizer
    s, t = world.heldout_pairs[0]
    prefix = torch.tensor([[s, t]])
    probs = torch.softmax(LegalUniformOracle(world).logits(prefix)[0, -1], -1)
    legal = tok.legal_next(s, t)
    assert torch.allclose(probs[legal], torch.full((len(legal),), 1 / len(legal)))
    assert probs.sum().item() == pytest.approx(1.0)
    best = ShortestPathOracle(world).logits(prefix)[0, -1].argmax().item()
    assert world.graph.distances_to(t)[tok.step(s, best)] == world.graph.distances_to(t)[s] - 1


def test_shortest_path_oracle_succeeds_everywhere(world):
    result = evaluate_paths(ShortestPathOracle(world), world, batch_size=64)
    assert result["success"] == 1.0 and result["pairs"] == len(world.heldout_pairs)
    assert result["counts"]["success"] == len(world.heldout_pairs)
    sampled = evaluate_paths(ShortestPathOracle(world), world, temperature=0.8, seed=3)
    assert sampled["success"] == 1.0


def test_legal_uniform_oracle_never_breaks_the_rules(world):
    for temperature in (0.0, 1.0):
        result = evaluate_paths(LegalUniformOracle(world), world, temperature=temperature, max_pairs=60)
        assert result["illegal_edge"] == 0 and result["invalid_format"] == 0
        assert result["success"] + result["wrong_target"] == pytest.approx(1.0)
    # a random legal walk ends only by chance at the destination: it fails some pairs
    assert result["success"] < 1.0


def test_uniform_model_greedy_emits_token_zero_an_invalid_format(world):
    # argmax of equal logits is token 0, a node token: every sequence is invalid at its first step (strict);
    # test_accuracy.py skips node tokens and counts a sequence without any move as "disconnected"
    result = evaluate_paths(UniformModel(world.vocab_size), world)
    assert result["strict"]["invalid_format"] == 1.0
    assert result["strict"]["counts"]["invalid_format"] == len(world.heldout_pairs)
    assert result["illegal_edge"] == 1.0 and result["invalid_format"] == 0.0


def expected_uniform_rates(world, pairs, max_moves):
    """Exact outcome probabilities of uniform sampling, by dynamic programming over the walk."""
    tok, n, V = world.tokenizer, world.graph.num_nodes, world.vocab_size
    num_moves = tok.eos_id - tok.first_move
    non_moves = V - num_moves - 1  # node tokens and <pad>
    step = np.zeros((n, n))
    for u, v in world.graph.edges:
        step[u, v] = 1 / V
    degree = np.array([len(world.graph.successors(u)) for u in range(n)])
    totals = dict.fromkeys(("success", "illegal_edge", "wrong_target", "invalid_format"), 0.0)
    for s, t in pairs:
        alive = np.zeros(n)
        alive[s] = 1.0
        for _ in range(max_moves + 1):
            totals["success"] += alive[t] / V
            totals["wrong_target"] += (alive.sum() - alive[t]) / V
            totals["invalid_format"] += alive.sum() * non_moves / V
            totals["illegal_edge"] += (alive * (num_moves - degree)).sum() / V
            alive = alive @ step
        totals["wrong_target"] += alive.sum()
    return {k: v / len(pairs) for k, v in totals.items()}


def test_uniform_model_sampled_rates_match_the_exact_computation(world):
    pairs = world.heldout_pairs * 12
    max_moves = 4
    records = decode_pairs(UniformModel(world.vocab_size), world, pairs, temperature=1.0, seed=0,
                           batch_size=512, max_moves=max_moves)
    expected = expected_uniform_rates(world, pairs, max_moves)
    assert sum(expected.values()) == pytest.approx(1.0)
    for outcome, p in expected.items():
        observed = np.mean([r["outcome_strict"] == outcome for r in records])
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / len(pairs)) + 1e-3, outcome


def test_sampling_is_seeded(world):
    model = UniformModel(world.vocab_size)
    a = evaluate_paths(model, world, temperature=1.0, seed=5, max_pairs=50)
    b = evaluate_paths(model, world, temperature=1.0, seed=5, max_pairs=50)
    assert a == b


def test_outcomes_on_a_hand_built_world():
    # 0 -> 1 -> 2 in a line; a scripted model plays one fixed continuation per pair
    g = Graph(3, [(0, 1), (1, 2), (1, 0), (2, 1)])
    from ds_mtp.experiments.worlds import World
    from ds_mtp.experiments.worlds.tokenize import IncrementTokenizer
    tok = IncrementTokenizer(g)
    inc = lambda d: tok.token_id[f"inc_{d}"]  # noqa: E731
    scripts = {(0, 2): [inc(1), inc(1), tok.eos_id],  # success
               (2, 0): [inc(-2)],                     # illegal: 2 -> 0 is not an edge
               (1, 2): [inc(-1), tok.eos_id],         # stops at 0: wrong target
               (1, 0): [2],                           # a node token: invalid format
               (0, 1): [inc(1), inc(-1)] * 10}        # never stops: wrong target, unterminated
    world = World("line", g, tok, [], list(scripts))

    class Scripted:
        def logits(self, tokens):
            out = torch.zeros(*tokens.shape, tok.vocab_size)
            for b, row in enumerate(tokens.tolist()):
                script = scripts[(row[0], row[1])]
                k = len(row) - 2
                out[b, -1, script[k] if k < len(script) else tok.pad_id] = 10.0
            return out

    result = evaluate_paths(Scripted(), world, max_moves=6)
    assert result["strict"]["counts"] == {"success": 1, "illegal_edge": 1, "wrong_target": 2, "invalid_format": 1}
    assert result["unterminated"] == 1 and result["strict"]["success"] == pytest.approx(0.2)
    # officially (test_accuracy.py): (0, 1) arrives at its first move; (1, 0) has no move ("disconnected")
    assert result["counts"] == {"success": 2, "illegal_edge": 2, "wrong_target": 1, "invalid_format": 0}
