"""ds-mtp's default metrics against the paper's official scripts (github.com/QiminZhong/LSE-MTP, commit dabe733).

Every expected number below was produced by running the official script's own functions on the same
hand-made case, in a scratch directory outside this repository, with the fake model ``FakeModel``
defines (the same formulas, written as a module the scripts can hook: ``transformer.ln_f`` and
``forward(x) -> ((logits,), None)``). Nothing of the scripts is copied here; only their outputs are.
The fake model is defined on token strings, which name the same tokens in both vocabularies (the
official ``[PAD]`` and ``\\n`` are ds-mtp's ``<pad>`` and ``<eos>``).
"""

import math

import numpy as np
import pytest
import torch

from ds_mtp.experiments.evaluate.paper import belief_cosines, shortcut_scores, structure_gain
from ds_mtp.experiments.evaluate.paths import judge
from ds_mtp.experiments.worlds import World
from ds_mtp.experiments.worlds.graphs import Graph
from ds_mtp.experiments.worlds.tokenize import IncrementTokenizer


def code(token: str) -> float:
    if token in ("[PAD]", "<pad>"):
        return 40.0
    if token in ("\n", "<eos>"):
        return 41.0
    if token.startswith("inc_"):
        return 20.0 + int(token[4:])
    return float(int(token))


class FakeModel:
    """h_t[j] = Σ_{s ≤ t} cos(0.5 code(token_s) (j + 1) + 0.3 s), j < 8 (causal); next-token logits after the
    prompt ``a g``: 3 sin(0.9 code(v) + 0.37 a + 0.11 g) for every token v."""

    def __init__(self, world):
        self.vocab = world.tokenizer.vocab

    def hidden(self, tokens):
        codes = torch.tensor([[code(self.vocab[t]) for t in row] for row in tokens.tolist()], dtype=torch.float64)
        j = torch.arange(1, 9, dtype=torch.float64)
        s = torch.arange(tokens.shape[1], dtype=torch.float64)
        return torch.cos(0.5 * codes[..., None] * j + 0.3 * s[None, :, None]).cumsum(dim=1)

    def logits(self, tokens):
        vocab = torch.tensor([code(v) for v in self.vocab], dtype=torch.float64)
        out = []
        for a, g in tokens[:, :2].tolist():
            a, g = code(self.vocab[a]), code(self.vocab[g])
            out.append(3 * torch.sin(0.9 * vocab + 0.37 * a + 0.11 * g))
        return torch.stack(out)[:, None, :].expand(tokens.shape[0], tokens.shape[1], len(self.vocab))


def line_world(n: int, chord: tuple[int, int], heldout) -> World:
    """A line 0-1-…-(n-1), both ways, plus one chord both ways (an odd cycle: every shortest path is unique)."""
    edges = [(i, i + 1) for i in range(n - 1)] + [chord]
    graph = Graph(n, edges + [(v, u) for u, v in edges])
    return World("line", graph, IncrementTokenizer(graph), [], list(heldout))


# ---------------------------------------------------------------------------------------------------------
# test_accuracy.py: parse_generated_path + validate_path on the text its decode() gives ("src tgt gen…",
# cut at the first "\n"), on the graph 0-1, 1-2, 2-3, 3-4, 4-5, 1-4, 0-2 (both ways).
OFFICIAL_PATH_OUTCOMES = [
    (0, 3, ["inc_2", "inc_1", "\n"], "success"),
    (0, 3, ["inc_2", "inc_1", "inc_1", "\n"], "success"),
    (0, 3, ["inc_1", "inc_3", "inc_-1", "[PAD]"], "success"),
    (0, 3, ["inc_1", "inc_5"], "disconnected"),
    (0, 3, ["inc_1", "2", "inc_1", "inc_1", "\n"], "success"),
    (0, 5, ["inc_1", "\n"], "wrong_target"),
    (0, 5, ["inc_1", "inc_-1"] * 3, "wrong_target"),
    (2, 0, ["\n"], "disconnected"),
    (0, 3, ["inc_1", "[PAD]", "inc_1", "inc_1"], "wrong_target"),
    (0, 3, ["inc_2", "inc_2"], "disconnected"),
    (0, 3, ["inc_2", "inc_1", "inc_5", "\n"], "success"),
    (5, 0, ["3", "3", "3"], "disconnected"),
]
# ds-mtp's strict definition (EOS at the goal) on the same generations
STRICT_OUTCOMES = ["success", "wrong_target", "invalid_format", "illegal_edge", "invalid_format", "wrong_target",
                   None, "wrong_target", "invalid_format", "illegal_edge", "illegal_edge", "invalid_format"]


def test_path_outcomes_are_test_accuracy_py_s():
    edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (1, 4), (0, 2)]
    graph = Graph(6, edges + [(v, u) for u, v in edges])
    tok = IncrementTokenizer(graph)
    names = {"\n": "<eos>", "[PAD]": "<pad>"}
    official_name = {"disconnected": "illegal_edge"}  # ds-mtp's name for the script's outcome
    for (s, t, generated, expected), strict in zip(OFFICIAL_PATH_OUTCOMES, STRICT_OUTCOMES):
        ids = [tok.token_id[names.get(x, x)] for x in generated]
        assert judge(tok, s, t, ids) == (official_name.get(expected, expected), strict), (s, t, generated)


# ---------------------------------------------------------------------------------------------------------
# eval_structural_hallucinations.py: evaluate_model_isp on the triples below (line of 8 nodes + chord 2-6),
# legal moves = every successor of a.
def test_isp_and_legal_step_probability_are_the_scripts():
    world = line_world(8, (2, 6), [])
    triples = [(0, 3, 7), (7, 4, 0), (1, 6, 4), (5, 1, 0), (3, 0, 6)]
    r = shortcut_scores(FakeModel(world), world, triples)
    assert r["isp"] == pytest.approx(0.008581149329353893, rel=1e-5)
    assert r["legal_step_probability"] == pytest.approx(0.10303292305034457, rel=1e-5)  # a sum over a's moves
    assert r["mean_legal_move_probability"] < r["legal_step_probability"]


# ---------------------------------------------------------------------------------------------------------
# eval_representation_alignment.py: extract_states + compute_gain on the held-out lines of every pair of a
# line of 12 nodes + chord 2-8 (132 pairs, unique shortest paths). No k-ahead group exceeds 100 states, so
# the aligned mean is deterministic; the random baseline's mean and spread are over 1,000 seeds of the script.
OFFICIAL_STRUCTURE = {
    2: dict(states=154, shared=0.15889357146860017, random_mean=0.07667662805853302, random_sd=0.0116),
    3: dict(states=74, shared=0.15240626491395068, random_mean=0.07341202467752583, random_sd=0.0196),
}


@pytest.mark.parametrize("k", [2, 3])
def test_structure_gain_is_the_scripts(k):
    n = 12
    world = line_world(n, (2, 8), [(u, v) for u in range(n) for v in range(n) if u != v])
    ref = OFFICIAL_STRUCTURE[k]
    r = structure_gain(FakeModel(world), world, ks=(k,), num_sequences=0)[f"k{k}"]
    assert r["states"] == ref["states"]
    assert r["shared_cosine"] == pytest.approx(ref["shared"], abs=1e-6)
    # a baseline that also paired states sharing the k-ahead token would be ~0.13, 5 sd away
    assert abs(r["random_cosine"] - ref["random_mean"]) < 3 * ref["random_sd"]
    assert r["gain"] == pytest.approx(r["shared_cosine"] - r["random_cosine"])
    # with many more random draws our baseline converges to the script's mean over its seeds
    many = structure_gain(FakeModel(world), world, ks=(k,), num_sequences=0, num_random=200_000)[f"k{k}"]
    assert many["random_cosine"] == pytest.approx(ref["random_mean"], abs=0.003)


def test_structure_gain_states_start_at_the_first_move_without_eos_on_paths_of_three_moves_or_more():
    # line of 8 + chord 2-6; the script's extract_states (k = 3) on these 11 lines reads 5 states, whose
    # (next, 3-ahead) tokens are these, and compute_gain's aligned mean is 0.6158332647628538
    pairs = [(0, 7), (7, 0), (0, 4), (1, 6), (3, 7), (6, 0), (4, 0), (5, 1), (0, 5), (7, 3), (1, 3)]
    world = line_world(8, (2, 6), pairs)
    r = structure_gain(FakeModel(world), world, ks=(3,), num_sequences=0)["k3"]
    assert r["states"] == 5
    assert r["shared_cosine"] == pytest.approx(0.6158332647628538, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# eval_belief_compression.py: get_latent_rep (state at position -2 of "src tgt inc…") and the cosine of each
# pair, averaged per group, on these hand-made (walk, goal) pairs of the line of 8 + chord 2-6.
BELIEF_CASES = {
    "same_node_same_goal": [(([0, 1, 2, 3], 6), ([5, 6, 2, 3], 6)), (([7, 6, 2], 0), ([4, 3, 2], 0))],
    "same_node_diff_goal": [(([0, 1, 2, 3], 7), ([5, 6, 2, 3], 0)), (([1, 2, 6, 5], 4), ([2, 3, 4, 5], 7))],
    "diff_node_same_goal": [(([0, 1, 2], 5), ([7, 6, 5], 5)), (([3, 4, 5, 6], 1), ([0, 1], 1))],
    "diff_node_diff_goal": [(([0, 1, 2], 5), ([7, 6, 5], 3)), (([3, 4], 0), ([6, 2, 1], 7))],
}
OFFICIAL_BELIEF = {"same_node_same_goal": 0.5816951113472519, "same_node_diff_goal": 0.5761124565287358,
                   "diff_node_same_goal": -0.05389672086539021, "diff_node_diff_goal": -0.2298150170262802}


def test_belief_groups_read_the_scripts_state():
    world = line_world(8, (2, 6), [])
    tok = world.tokenizer

    def prefix(walk, goal):
        return [walk[0], goal] + [tok.move_token(a, b) for a, b in zip(walk, walk[1:])]

    trials = {g: [(prefix(*p), prefix(*q)) for p, q in cases] for g, cases in BELIEF_CASES.items()}
    r = belief_cosines(FakeModel(world), world, trials)
    for group, expected in OFFICIAL_BELIEF.items():
        assert r[group]["cosine"] == pytest.approx(expected, abs=1e-6), group
    last = belief_cosines(FakeModel(world), world, trials, read_at="last")
    assert not math.isclose(last["same_node_same_goal"]["cosine"], OFFICIAL_BELIEF["same_node_same_goal"],
                            abs_tol=1e-3)
    assert np.isfinite(last["diff_node_diff_goal"]["cosine"])
