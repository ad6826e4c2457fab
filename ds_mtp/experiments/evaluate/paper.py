"""The LSE-MTP paper's representation and hallucination metrics (Zhong et al., 2026), as its official
scripts (github.com/QiminZhong/LSE-MTP, evaluation/) compute them.

- ``illegal_shortcuts``: Illegal Shortcut Probability (ISP) and Legal Step Probability
  (``eval_structural_hallucinations.py``).
- ``structure_gain``: do hidden states that share the k-ahead token (but not the next one) align?
  (``eval_representation_alignment.py``).
- ``belief_similarity``: cosine similarity of the states of two prefixes in four groups (same /
  different current node x same / different goal): belief compression and goal distinction
  (``eval_belief_compression.py``).

Hidden states are the model's final (post-norm) trunk states ``model.hidden`` (the scripts hook the
final LayerNorm). ds-mtp's own variants keep their own names; docs/worlds.md lists them.
"""

from __future__ import annotations

import numpy as np

from ds_mtp.errors import UserError
from ds_mtp.experiments.evaluate.common import WorldIndex, cosine_rows, heldout_sequences, hidden_at, last_probs


def shortcut_triples(world, num_triples: int = 5000, seed: int = 0, min_hops: int = 2,
                     max_hops: int = 4) -> list[tuple[int, int, int]]:
    """Triples (a, b, g) as eval_structural_hallucinations.py mines them: a uniform goal g, then two distinct
    nodes a, b among those ``min_hops``..``max_hops`` hops before g, kept when there is no edge a→b and a has
    a successor."""
    index = WorldIndex(world)
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
    return triples


def shortcut_scores(model, world, triples, batch_size: int = 256) -> dict:
    """ISP and legal-step probabilities of ``model`` after the prompt ``a g`` of each triple (a, b, g).

    As evaluate_model_isp of eval_structural_hallucinations.py: ``isp`` = mean probability of the
    (illegal) step a→b; ``legal_step_probability`` = mean total probability of a's legal moves. ds-mtp's
    ``mean_legal_move_probability`` = mean over triples of the mean probability of one legal move of a (per
    move, comparable to ISP, a single step). The direction format has no token for a non-edge, so ISP is
    None there (the model cannot express the shortcut).
    """
    tok = world.tokenizer
    probs = last_probs(model, [[a, g] for a, _, g in triples], world, batch_size).numpy()
    shortcut = [tok.move_token(a, b) for a, b, _ in triples]
    legal = [tok.legal_moves(a) for a, _, _ in triples]
    isp = None
    if all(s is not None for s in shortcut):
        isp = float(np.mean(probs[np.arange(len(triples)), shortcut]))
    return {"isp": isp,
            "legal_step_probability": float(np.mean([probs[i, m].sum() for i, m in enumerate(legal)])),
            "mean_legal_move_probability": float(np.mean([probs[i, m].mean() for i, m in enumerate(legal)]))}


def illegal_shortcuts(model, world, num_triples: int = 5000, seed: int = 0, min_hops: int = 2,
                      max_hops: int = 4, batch_size: int = 256) -> dict:
    """ISP, Legal Step Probability (and ds-mtp's per-move mean) over ``num_triples`` triples: see
    ``shortcut_triples`` and ``shortcut_scores`` (eval_structural_hallucinations.py)."""
    triples = shortcut_triples(world, num_triples, seed, min_hops, max_hops)
    if not triples:
        return {"triples": 0, "isp": None, "legal_step_probability": None, "mean_legal_move_probability": None,
                "skipped_reason": f"no node pairs {min_hops}-{max_hops} hops before a common goal"}
    return {"triples": len(triples), **shortcut_scores(model, world, triples, batch_size),
            "min_hops": min_hops, "max_hops": max_hops}


STRUCTURE_MIN_MOVES = 3  # eval_representation_alignment.py skips lines of fewer than 5 words: src, tgt, 3 moves
STRUCTURE_GROUP_SAMPLE = 100  # states drawn per k-ahead group for the aligned pairs
STRUCTURE_MAX_RANDOM = 5000  # cap on the random baseline's draws


def structure_states(seqs: list[list[int]], k: int, eos_id: int) -> tuple[list[tuple[int, int]], np.ndarray,
                                                                        np.ndarray]:
    """The states eval_representation_alignment.py (extract_states) reads on ``src tgt move…`` sequences
    (their end-of-sequence token, when present, is no part of them): every position i from the first move
    (i = 2) with a k-ahead move, i + k < 2 + moves, on sequences of at least 3 moves. Returns
    ((sequence, position) of each state, next tokens, k-ahead tokens)."""
    where, nxt, ahead = [], [], []
    for s, seq in enumerate(seqs):
        moves = seq[:-1] if seq and seq[-1] == eos_id else seq
        length = len(moves)
        if length - 2 < STRUCTURE_MIN_MOVES:
            continue
        for i in range(2, length - k):
            where.append((s, i))
            nxt.append(moves[i + 1])
            ahead.append(moves[i + k])
    return where, np.array(nxt, dtype=np.int64), np.array(ahead, dtype=np.int64)


def gain_from_states(states: np.ndarray, nxt: np.ndarray, ahead: np.ndarray, rng: np.random.Generator,
                     num_random: int | None = None) -> dict:
    """compute_gain of eval_representation_alignment.py. Aligned pairs: within each group of states sharing the
    k-ahead token (at most 100 of them drawn), every pair whose next tokens differ. Random baseline:
    ``num_random`` draws (default min(aligned pairs, 5000), or 5000 without any) of two states, uniform with
    replacement, kept when their k-ahead tokens differ. Gain = mean aligned cosine − mean random cosine; None
    when either set is empty (the script would report 0 for it)."""
    aligned_a, aligned_b = [], []
    for token in np.unique(ahead):
        members = np.nonzero(ahead == token)[0]
        if members.size < 2:
            continue
        sub = rng.choice(members, size=min(members.size, STRUCTURE_GROUP_SAMPLE), replace=False)
        i, j = np.triu_indices(sub.size, 1)
        differ = nxt[sub[i]] != nxt[sub[j]]
        aligned_a.append(sub[i][differ])
        aligned_b.append(sub[j][differ])
    aligned_a = np.concatenate(aligned_a) if aligned_a else np.zeros(0, np.int64)
    aligned_b = np.concatenate(aligned_b) if aligned_b else np.zeros(0, np.int64)
    if num_random is None:
        num_random = min(aligned_a.size, STRUCTURE_MAX_RANDOM) if aligned_a.size else STRUCTURE_MAX_RANDOM
    ra, rb = rng.integers(len(states), size=(2, num_random))
    keep = ahead[ra] != ahead[rb]
    shared = float(cosine_rows(states[aligned_a], states[aligned_b]).mean()) if aligned_a.size else None
    random_cos = float(cosine_rows(states[ra[keep]], states[rb[keep]]).mean()) if keep.any() else None
    gain = None if shared is None or random_cos is None else shared - random_cos
    return {"gain": gain, "shared_cosine": shared, "random_cosine": random_cos, "pairs": int(aligned_a.size),
            "random_pairs": int(keep.sum()), "states": int(len(states))}


def structure_gain(model, world, ks=(2, 3), num_sequences: int = 1000, seed: int = 0, max_len: int = 128,
                   batch_size: int = 256, num_random: int | None = None) -> dict:
    """Structure Gain at each k, as eval_representation_alignment.py computes it (``structure_states``,
    ``gain_from_states``), on one hop-shortest path for each of ``num_sequences`` held-out pairs (0 = all),
    teacher-forced: the state at position i (a causal model's state after the prefix up to i) predicts
    token i + 1."""
    seqs, dropped = heldout_sequences(world, num_sequences, seed, max_len)
    rng = np.random.default_rng([seed, 13])
    result: dict = {"sequences": len(seqs), "dropped_too_long": dropped}
    for k in ks:
        where, nxt, ahead = structure_states(seqs, k, world.tokenizer.eos_id)
        if len(where) < 2:
            result[f"k{k}"] = {"gain": None, "shared_cosine": None, "random_cosine": None, "pairs": 0,
                               "random_pairs": 0, "states": len(where)}
            continue
        positions: dict[int, list[int]] = {}
        for s, i in where:  # in sequence order, so hidden_at returns the states in the order of ``where``
            positions.setdefault(s, []).append(i)
        states = hidden_at(model, [seqs[s] for s in positions], list(positions.values()), world, batch_size)
        result[f"k{k}"] = gain_from_states(states, nxt, ahead, rng, num_random)
    return result


BELIEF_GROUPS = ("same_node_same_goal", "same_node_diff_goal", "diff_node_same_goal", "diff_node_diff_goal")
BELIEF_PREFIXES = ("reverse_walk", "shortest_path")
BELIEF_READ_AT = ("second_to_last", "last")


def reverse_walk(index: WorldIndex, node: int, moves: int, rng: np.random.Generator) -> list[int] | None:
    """sample_path_reverse of eval_belief_compression.py: ``moves`` uniform steps to predecessors from
    ``node``, returned in walking order (ending at ``node``); None when a node has no predecessor."""
    walk = [node]
    for _ in range(moves):
        preds = index.predecessors[walk[-1]]
        if not preds:
            return None
        walk.append(preds[int(rng.integers(len(preds)))])
    return walk[::-1]


def official_belief_trials(world, num_trials: int, rng: np.random.Generator) -> dict[str, list]:
    """find_test_groups of eval_belief_compression.py: per group, ``num_trials`` pairs of (walk, goal).

    Same node (both groups from one draw): a uniform node p, two reverse walks of U{3..6} moves ending at p
    with different origins, and two distinct goals reachable from p (same goal: the first for both).
    Different nodes: two distinct uniform nodes, reverse walks of U{2..4} moves; same goal: one reachable
    from both (either node itself counts); different goals: one reachable from each, kept when they differ.
    """
    from ds_mtp.experiments.worlds.datasets import bfs_tree

    index = WorldIndex(world)
    n = world.graph.num_nodes
    reach_cache: dict[int, np.ndarray] = {}

    def reach(u):  # nodes reachable from u, u itself included (networkx's has_path(G, u, u))
        if u not in reach_cache:
            reach_cache[u] = np.nonzero(bfs_tree(world.graph, u)[0] >= 0)[0]
        return reach_cache[u]

    trials: dict[str, list] = {g: [] for g in BELIEF_GROUPS}
    limit = 50 * num_trials + 1000
    attempts = 0
    while (len(trials["same_node_same_goal"]) < num_trials or len(trials["same_node_diff_goal"]) < num_trials) \
            and attempts < limit:
        attempts += 1
        p = int(rng.integers(n))
        w1 = reverse_walk(index, p, int(rng.integers(3, 7)), rng)
        w2 = reverse_walk(index, p, int(rng.integers(3, 7)), rng)
        if w1 is None or w2 is None or w1[0] == w2[0]:
            continue
        targets = reach(p)[reach(p) != p]
        if targets.size >= 2:
            t1, t2 = (int(x) for x in rng.choice(targets, size=2, replace=False))
            if len(trials["same_node_same_goal"]) < num_trials:
                trials["same_node_same_goal"].append(((w1, t1), (w2, t1)))
            if len(trials["same_node_diff_goal"]) < num_trials:
                trials["same_node_diff_goal"].append(((w1, t1), (w2, t2)))
    attempts = 0
    while (len(trials["diff_node_diff_goal"]) < num_trials or len(trials["diff_node_same_goal"]) < num_trials) \
            and attempts < limit:
        attempts += 1
        n1, n2 = (int(x) for x in rng.choice(n, size=2, replace=False))
        w1 = reverse_walk(index, n1, int(rng.integers(2, 5)), rng)
        w2 = reverse_walk(index, n2, int(rng.integers(2, 5)), rng)
        if w1 is None or w2 is None:
            continue
        common = np.intersect1d(reach(n1), reach(n2))
        if common.size and len(trials["diff_node_same_goal"]) < num_trials:
            t = int(common[rng.integers(common.size)])
            trials["diff_node_same_goal"].append(((w1, t), (w2, t)))
        t1, t2 = int(reach(n1)[rng.integers(reach(n1).size)]), int(reach(n2)[rng.integers(reach(n2).size)])
        if t1 != t2 and len(trials["diff_node_diff_goal"]) < num_trials:
            trials["diff_node_diff_goal"].append(((w1, t1), (w2, t2)))
    tok = world.tokenizer
    return {g: [tuple([w[0], t] + [tok.move_token(a, b) for a, b in zip(w, w[1:])] for w, t in pair)
                for pair in pairs] for g, pairs in trials.items()}


def shortest_path_belief_trials(world, num_trials: int, rng: np.random.Generator, max_len: int) -> dict[str, list]:
    """ds-mtp's variant: two different prefixes of hop-shortest paths towards their goals
    (``WorldIndex.shortest_prefix``, at least one move), current node and goal related as each group says."""
    index = WorldIndex(world)
    n = world.graph.num_nodes
    max_moves = max(1, max_len - 3)  # room for the prompt and one more token
    trials: dict[str, list] = {}
    for group in BELIEF_GROUPS:
        same_node, same_goal = group.startswith("same_node"), group.endswith("same_goal")
        pairs, attempts = [], 0
        while len(pairs) < num_trials and attempts < 50 * num_trials + 1000:
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
            pairs.append((p1, p2))
        trials[group] = pairs
    return trials


def belief_cosines(model, world, trials: dict[str, list], read_at: str = "second_to_last",
                   batch_size: int = 256) -> dict:
    """Per group, the mean cosine similarity of the two prefixes' states (``trials``: {group: [(prefix 1,
    prefix 2)]}, prefixes as token lists ``origin goal move…``). ``read_at="second_to_last"`` reads the state
    at position −2 as get_latent_rep of eval_belief_compression.py does (before the last move is read);
    "last" at the last token (ds-mtp's variant: the state at the current node)."""
    if read_at not in BELIEF_READ_AT:
        raise UserError(f"belief read_at must be one of {', '.join(BELIEF_READ_AT)} (got {read_at!r})")
    back = 2 if read_at == "second_to_last" else 1
    result: dict = {}
    for group in BELIEF_GROUPS:
        pairs = trials.get(group, [])
        if not pairs:
            result[group] = {"cosine": None, "trials": 0}
            continue
        firsts, seconds = [list(p) for p, _ in pairs], [list(q) for _, q in pairs]
        h1 = hidden_at(model, firsts, [[len(p) - back] for p in firsts], world, batch_size)
        h2 = hidden_at(model, seconds, [[len(p) - back] for p in seconds], world, batch_size)
        result[group] = {"cosine": float(cosine_rows(h1, h2).mean()), "trials": len(pairs)}
    return result


def belief_similarity(model, world, num_trials: int = 1000, seed: int = 0, max_len: int = 128,
                      batch_size: int = 256, prefixes: str = "reverse_walk",
                      read_at: str = "second_to_last") -> dict:
    """Mean cosine similarity of the states of two prefixes, per group of (current node, goal) relation.

    By default as eval_belief_compression.py: reverse random walks (``official_belief_trials``), states read
    at position −2. ds-mtp's variant (``prefixes="shortest_path"``, ``read_at="last"``): prefixes of
    hop-shortest paths, states at the last token. Belief compression = similarity in
    ``same_node_same_goal``; goal distinction = same_node_same_goal − same_node_diff_goal; node
    distinction = same_node_same_goal − diff_node_same_goal.
    """
    if prefixes not in BELIEF_PREFIXES:
        raise UserError(f"belief prefixes must be one of {', '.join(BELIEF_PREFIXES)} (got {prefixes!r})")
    if read_at not in BELIEF_READ_AT:
        raise UserError(f"belief read_at must be one of {', '.join(BELIEF_READ_AT)} (got {read_at!r})")
    rng = np.random.default_rng([seed, 17])
    if prefixes == "reverse_walk":
        trials = official_belief_trials(world, num_trials, rng)
        # the longest reverse walk (6 moves) is 8 tokens; a shorter context drops what does not fit
        trials = {g: [(p, q) for p, q in pairs if max(len(p), len(q)) <= max_len] for g, pairs in trials.items()}
    else:
        trials = shortest_path_belief_trials(world, num_trials, rng, max_len)
    result = belief_cosines(model, world, trials, read_at, batch_size)

    def cos(group):
        return result[group]["cosine"]

    def diff(a, b):
        return None if cos(a) is None or cos(b) is None else cos(a) - cos(b)

    result["prefixes"], result["read_at"] = prefixes, read_at
    result["compression"] = cos("same_node_same_goal")
    result["goal_distinction"] = diff("same_node_same_goal", "same_node_diff_goal")
    result["node_distinction"] = diff("same_node_same_goal", "diff_node_same_goal")
    return result
