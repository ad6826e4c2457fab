"""evaluate_all / headline on reference models whose scores are known, and on a real (untrained) model."""

import json

import numpy as np
import pytest
import torch

from ds_mtp.config import ModelConfig
from ds_mtp.errors import UserError
from ds_mtp.experiments.evaluate.reference_models import LegalUniformOracle, ShortestPathOracle, UniformModel
from ds_mtp.experiments.evaluate.suite import DEFAULT_SCALE, METRICS, QUICK_SCALE, evaluate_all, headline
from ds_mtp.model import MTPModel, load_exported, save_exported
from ds_mtp.experiments.worlds import load_world, make_world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return make_world("usg", "paper", tmp_path_factory.mktemp("w"), seed=0, n=20)


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


@pytest.fixture(scope="module")
def oracle_results(world):
    model = LegalUniformOracle(world)
    return {**evaluate_all(model, world, "quick", seed=1), "_model": model, "_world": world}


def test_legal_oracle_is_a_perfect_world_model(oracle_results):
    h = headline(oracle_results)
    for name in ("next_token_validity", "sequence_validity", "compression_precision", "distinction_precision",
                 "distinction_recall", "probe_accuracy", "legal_step_probability"):
        assert h[name] == pytest.approx(1.0), name
    assert h["isp"] == 0.0 and h["illegal_edge_greedy"] == 0.0 and h["invalid_format_sampled"] == 0.0
    # its state is one-hot (node) + one-hot (goal). Read where the official script reads (position -2, the
    # node before the last move), the same-goal groups share the goal half at least.
    assert 0.5 <= h["belief_same_node_same_goal"] < 1.0 and h["belief_same_node_diff_goal"] < 0.5
    # ds-mtp's variant reads the current node: cosines 1, 1/2, 1/2, 0 in the four belief groups
    variant = {**QUICK_SCALE, "belief_prefixes": "shortest_path", "belief_read_at": "last"}
    hv = headline(evaluate_all(oracle_results["_model"], oracle_results["_world"], variant, seed=1,
                               metrics=["belief"]))
    assert hv["belief_same_node_same_goal"] == pytest.approx(1.0)
    assert hv["belief_same_node_diff_goal"] == pytest.approx(0.5)
    assert hv["belief_diff_node_same_goal"] == pytest.approx(0.5)
    assert hv["belief_diff_node_diff_goal"] == pytest.approx(0.0)
    m = oracle_results["metrics"]
    assert m["compression"]["trials"] == QUICK_SCALE["compression_trials"] - sum(m["compression"]["skipped"].values())
    assert m["compression"]["trials"] > 0 and m["distinction"]["trials"] > 0
    assert m["distinction"]["mean_boundary_size"] > 0  # recall was measured on a non-empty boundary


def test_results_are_json_and_headline_is_flat(oracle_results, world):
    oracle_results = {k: v for k, v in oracle_results.items() if not k.startswith("_")}
    text = json.dumps(oracle_results, allow_nan=False)
    assert json.loads(text)["world"]["num_nodes"] == world.graph.num_nodes
    h = headline(oracle_results)
    assert all(isinstance(v, float) for v in h.values())
    assert {"path_success_greedy", "path_success_sampled", "path_success_strict_greedy", "isp",
            "legal_step_probability", "mean_legal_move_probability", "structure_gain_k2",
            "structure_gain_k3", "goal_distinction", "detour_random_valid_p0.1"} <= set(h)
    assert set(oracle_results["metrics"]) == set(METRICS)


def test_uniform_model_scores_what_hand_computation_says(world):
    V = world.vocab_size
    model = UniformModel(V)
    h = headline(evaluate_all(model, world, "quick", metrics=["shortcuts", "validity", "compression",
                                                               "distinction", "paths"]))
    assert h["isp"] == pytest.approx(1 / V) and h["mean_legal_move_probability"] == pytest.approx(1 / V)
    degrees = [len(world.graph.successors(u)) for u in range(world.graph.num_nodes)]
    assert min(degrees) / V <= h["legal_step_probability"] <= max(degrees) / V
    assert h["next_token_validity"] == 0.0  # argmax of equal logits is token 0, a node token
    # the official parser skips node tokens: no move at all, which test_accuracy.py calls "disconnected"
    assert h["illegal_edge_greedy"] == 1.0 and h["path_success_strict_greedy"] == 0.0
    # every token has probability 1/V = 1/60 > epsilon = 0.01: it accepts every continuation after
    # every prefix, so it compresses perfectly, rejects nothing (precision 1 by convention) and
    # distinguishes nothing (recall 0)
    assert 1 / V > 0.01
    assert h["compression_precision"] == 1.0
    assert h["distinction_precision"] == 1.0 and h["distinction_recall"] == 0.0
    # with epsilon above 1/V it accepts nothing: no compression
    strict = evaluate_all(model, world, {**QUICK_SCALE, "epsilon": 0.02}, metrics=["compression"])
    assert headline(strict)["compression_precision"] == 0.0


def test_shortest_path_oracle_recovers_from_every_detour(world):
    scale = {**QUICK_SCALE, "detour_probs": [0.1, 0.5], "detour_types": list(DEFAULT_SCALE["detour_types"])}
    h = headline(evaluate_all(ShortestPathOracle(world), world, scale, metrics=["detour", "paths"]))
    assert h["path_success_greedy"] == 1.0 and h["path_success_sampled"] == 1.0
    detours = {k: v for k, v in h.items() if k.startswith("detour_")}
    assert len(detours) == 6 and all(v == 1.0 for v in detours.values())
    # the legal-uniform oracle never stops on purpose: greedy, it wanders without success
    assert headline(evaluate_all(LegalUniformOracle(world), world, scale, metrics=["detour"]))[
        "detour_random_valid_p0.1"] < 1.0


def test_bad_requests_are_user_errors(world):
    model = UniformModel(world.vocab_size)
    with pytest.raises(UserError, match="unknown metric"):
        evaluate_all(model, world, "quick", metrics=["nope"])
    with pytest.raises(UserError, match="unknown evaluation scale"):
        evaluate_all(model, world, "huge")
    with pytest.raises(UserError, match="scale key"):
        evaluate_all(model, world, {"pairs": 3})
    with pytest.raises(UserError, match="world.json"):
        evaluate_all(model, "/nonexistent/world", "quick")


def test_trial_loops_do_not_swallow_model_errors(world):
    class Broken(UniformModel):
        def logits(self, tokens):
            raise RuntimeError("boom")

    for metric in ("compression", "distinction", "detour", "validity"):
        with pytest.raises(RuntimeError, match="boom"):
            evaluate_all(Broken(world.vocab_size), world, "quick", metrics=[metric])


def test_exported_model_runs_every_metric_within_its_context(world, world_dir, tmp_path):
    cfg = ModelConfig(vocab_size=world.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=12,
                      positions="learned")
    torch.manual_seed(0)
    model = MTPModel(cfg, pad_id=world.tokenizer.pad_id)
    exported = load_exported(save_exported(model, model.state_dict(), tmp_path / "m"))
    longest = []
    original = exported.states

    def spy(tokens, doc_ids=None):
        longest.append(tokens.shape[1])
        return original(tokens, doc_ids)

    exported.states = spy
    results = evaluate_all(exported, world_dir, "quick", seed=0)
    assert max(longest) <= cfg.max_seq_len and results["max_len"] == cfg.max_seq_len
    h = headline(results)
    assert 0.0 <= h["next_token_validity"] <= 1.0 and 0.0 <= h["probe_accuracy"] <= 1.0
    assert np.isfinite(list(h.values())).all()


def test_same_seed_same_numbers(world):
    model = UniformModel(world.vocab_size)
    metrics = ["paths", "compression", "distinction", "detour", "belief", "probe"]
    a = evaluate_all(model, world, "quick", seed=4, metrics=metrics)["metrics"]
    b = evaluate_all(model, world, "quick", seed=4, metrics=metrics)["metrics"]
    c = evaluate_all(model, world, "quick", seed=5, metrics=metrics)["metrics"]
    assert a == b and a != c
