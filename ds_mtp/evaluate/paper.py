"""The LSE-MTP paper's representation and hallucination metrics (Zhong et al., 2026).

- ``illegal_shortcuts``: Illegal Shortcut Probability (ISP) and legal-step probability.
- ``structure_gain``: do hidden states that share the k-ahead token (but not the next one) align?
- ``belief_similarity``: cosine similarity of the states of two prefixes in four groups (same /
  different current node x same / different goal): belief compression and goal distinction.

Hidden states are the model's final (post-norm) trunk states ``model.hidden``. The state of a
prefix is read at its **last** token (the one that predicts the next move); the paper's script
reads the second-to-last, which is the state *before* the last move was made.
"""

from __future__ import annotations

import numpy as np

from ds_mtp.errors import UserError
from ds_mtp.evaluate.common import WorldIndex, cosine_rows, heldout_sequences, hidden_at, last_probs


def illegal_shortcuts(model, world, num_triples: int = 5000, seed: int = 0, min_hops: int = 2,
                      max_hops: int = 4, batch_size: int = 256) -> dict:
    """ISP and legal-step probability over ``num_triples`` triples (a, b, g).

    a and b are distinct nodes ``min_hops``..``max_hops`` hops before the goal g, with no edge a→b.
    After the prompt ``a g`` (origin a, destination g):
    ISP = mean probability of the (illegal) step a→b; legal-step probability = mean probability of
    one legal step out of a (the mean over a's out-edges, comparable to ISP per step); legal mass =
    mean total probability of a's legal moves. The direction format has no token for a non-edge, so
    ISP is reported as None there (the model cannot express the shortcut).
    """
    index, tok = WorldIndex(world), world.tokenizer
    n = world.graph.num_nodes
    rng = np.random.default_rng([seed, 11])
    triples: list[tuple[int, int, int]] = []
    attempts = 0
    while len(triples) < num_triples and attempts < 50 * num_triples + 1000:
        attempts += 1
        g = int(rng.integers(n))
        d = index.dist_to(g)
        band = np.nonzero((d >= min_hops) & (d <= max_hops))[0]
        if band.size < 2:
            continue
        a, b = (int(x) for x in rng.choice(band, size=2, replace=False))
        if world.graph.has_edge(a, b) or not world.graph.successors(a):
            continue
        triples.append((a, b, g))
    if not triples:
        return {"triples": 0, "isp": None, "legal_step_probability": None, "legal_mass": None,
                "skipped_reason": f"no node pairs {min_hops}-{max_hops} hops before a common goal"}
    probs = last_probs(model, [[a, g] for a, _, g in triples], world, batch_size).numpy()
    shortcut = [tok.move_token(a, b) for a, b, _ in triples]
    legal = [tok.legal_moves(a) for a, _, _ in triples]
    legal_step = np.array([probs[i, m].mean() for i, m in enumerate(legal)])
    legal_mass = np.array([probs[i, m].sum() for i, m in enumerate(legal)])
    isp = None
    if all(s is not None for s in shortcut):
        isp = float(np.mean(probs[np.arange(len(triples)), shortcut]))
    return {"triples": len(triples), "isp": isp, "legal_step_probability": float(legal_step.mean()),
            "legal_mass": float(legal_mass.mean()), "min_hops": min_hops, "max_hops": max_hops}


def structure_gain(model, world, ks=(2, 3), num_sequences: int = 2000, num_pairs: int = 5000, seed: int = 0,
                   max_len: int = 128, batch_size: int = 256) -> dict:
    """Structure Gain at each k: mean cosine of state pairs that share the k-ahead token but not the
    next token, minus the mean cosine of random state pairs.

    States are read teacher-forced on one hop-shortest path per held-out pair. The state at
    position t predicts token t+1; its k-ahead token is token t+k. Positions run from the
    destination token (t = 1) to the last one with a k-ahead token. ``num_pairs`` pairs per group.
    """
    seqs, dropped = heldout_sequences(world, num_sequences, seed, max_len)
    positions = [list(range(1, len(s) - 1)) for s in seqs]  # every position with a next token
    states = hidden_at(model, seqs, positions, world, batch_size)
    owner = np.concatenate([[i] * len(p) for i, p in enumerate(positions)]) if positions else np.zeros(0, int)
    pos = np.concatenate(positions) if positions else np.zeros(0, int)
    seq_len = np.array([len(s) for s in seqs])
    rng = np.random.default_rng([seed, 13])
    result: dict = {"sequences": len(seqs), "dropped_too_long": dropped, "states": int(len(pos))}
    if len(pos) < 2:
        return {**result, **{f"k{k}": None for k in ks}}
    ri, rj = rng.integers(len(pos), size=(2, num_pairs))
    keep = ri != rj
    random_cos = float(cosine_rows(states[ri[keep]], states[rj[keep]]).mean())
    result["random_cosine"] = random_cos
    for k in ks:
        has_k = pos + k <= seq_len[owner] - 1
        idx = np.nonzero(has_k)[0]
        nxt = np.array([seqs[owner[i]][pos[i] + 1] for i in idx])
        ahead = np.array([seqs[owner[i]][pos[i] + k] for i in idx])
        groups: dict[int, np.ndarray] = {}
        for token in np.unique(ahead):
            members = np.nonzero(ahead == token)[0]
            if len(np.unique(nxt[members])) > 1:  # only groups where "not the next token" is possible
                groups[int(token)] = members
        pairs_a, pairs_b = [], []
        anchors = np.concatenate(list(groups.values())) if groups else np.zeros(0, int)
        for _ in range(num_pairs if anchors.size else 0):
            a = anchors[rng.integers(anchors.size)]
            members = groups[int(ahead[a])]
            candidates = members[nxt[members] != nxt[a]]
            b = candidates[rng.integers(candidates.size)]
            pairs_a.append(idx[a])
            pairs_b.append(idx[b])
        if not pairs_a:
            result[f"k{k}"] = {"gain": None, "pairs": 0, "shared_cosine": None}
            continue
        shared = float(cosine_rows(states[pairs_a], states[pairs_b]).mean())
        result[f"k{k}"] = {"gain": shared - random_cos, "shared_cosine": shared, "pairs": len(pairs_a)}
    return result


BELIEF_GROUPS = ("same_node_same_goal", "same_node_diff_goal", "diff_node_same_goal", "diff_node_diff_goal")


def belief_similarity(model, world, num_trials: int = 1000, seed: int = 0, max_len: int = 128,
                      batch_size: int = 256, read_at: str = "last") -> dict:
    """Mean cosine similarity of the states of two prefixes, per group of (current node, goal) relation.

    Each prefix is the start of a hop-shortest path towards its goal that has made at least one
    move (``WorldIndex.shortest_prefix``); the two prefixes of a trial always differ. Belief
    compression = similarity in ``same_node_same_goal`` (different histories, one world state: a
    consistent world model maps them together); goal distinction = same_node_same_goal −
    same_node_diff_goal (the goal is part of the state); node distinction = same_node_same_goal −
    diff_node_same_goal. ``read_at="second_to_last"`` reads the states one token earlier, as the
    paper's script does (before the last move was made).
    """
    if read_at not in ("last", "second_to_last"):
        raise UserError(f"belief read_at must be 'last' or 'second_to_last' (got {read_at!r})")
    back = 1 if read_at == "last" else 2
    index = WorldIndex(world)
    n = world.graph.num_nodes
    rng = np.random.default_rng([seed, 17])
    max_moves = max(1, max_len - 3)  # room for the prompt and one more token
    result: dict = {}
    for group in BELIEF_GROUPS:
        same_node, same_goal = group.startswith("same_node"), group.endswith("same_goal")
        firsts, seconds = [], []
        attempts = 0
        while len(firsts) < num_trials and attempts < 50 * num_trials + 1000:
            attempts += 1
            u1, g1 = (int(x) for x in rng.integers(n, size=2))
            u2 = u1 if same_node else int(rng.integers(n))
            g2 = g1 if same_goal else int(rng.integers(n))
            if (not same_node and u1 == u2) or (not same_goal and g1 == g2) or u1 in (g1, g2) or u2 in (g1, g2):
                continue
            p1 = index.shortest_prefix(u1, g1, rng, max_moves)
            p2 = index.shortest_prefix(u2, g2, rng, max_moves) if p1 is not None else None
            if p2 is None or p1 == p2:
                continue
            firsts.append(p1)
            seconds.append(p2)
        if not firsts:
            result[group] = {"cosine": None, "trials": 0}
            continue
        h1 = hidden_at(model, firsts, [[len(p) - back] for p in firsts], world, batch_size)
        h2 = hidden_at(model, seconds, [[len(p) - back] for p in seconds], world, batch_size)
        result[group] = {"cosine": float(cosine_rows(h1, h2).mean()), "trials": len(firsts)}

    def cos(group):
        return result[group]["cosine"]

    def diff(a, b):
        return None if cos(a) is None or cos(b) is None else cos(a) - cos(b)

    result["read_at"] = read_at
    result["compression"] = cos("same_node_same_goal")
    result["goal_distinction"] = diff("same_node_same_goal", "same_node_diff_goal")
    result["node_distinction"] = diff("same_node_same_goal", "diff_node_same_goal")
    return result
