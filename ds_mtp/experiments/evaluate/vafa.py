"""The world-model metrics of Vafa et al., "Evaluating the World Model Implicit in a Generative
Model" (NeurIPS 2024), on a deterministic graph world whose state is (current node, destination).

- ``next_token_validity``: the teacher-forced argmax is a legal next token of the true state.
- ``state_probe``: a multinomial logistic-regression probe of the current node on the final states.
- ``compression_precision``: two prefixes that reach the *same* state should accept the same
  continuations (Myhill-Nerode: same state, same future).
- ``distinction``: two prefixes that reach *different* states should be told apart exactly on the
  true Myhill-Nerode boundary (precision and recall).
- ``detour_robustness``: greedy decoding with forced detours still reaches the destination.

A model "accepts" a token sequence when each of its tokens has probability above ``epsilon``.
Prefixes are Vafa's backward random walks (``WorldIndex.backward_prefix``, conditioned on never
visiting the goal and never getting stuck) from a state (u, g) drawn from the world's
origin/destination pairs (u the pair's origin), of a length uniform among those possible in
1..``max_prefix_moves``, capped so that prefix, continuation and the route to the goal fit the
model's context. Trials whose state admits no prefix are counted in ``skipped``, never hidden:
no exception is swallowed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ds_mtp.experiments.evaluate import model_device
from ds_mtp.experiments.evaluate.common import (MAX_LOGITS_PER_BATCH, WorldIndex, argmax_tokens, heldout_sequences, hidden_at,
                                    is_legal, last_probs, suffix_valid, token_probs, walk_nodes)

DETOUR_TYPES = ("random_valid", "least_likely", "second_most_likely")
MIN_PROBE_STEPS = 500


def next_token_validity(model, world, num_sequences: int = 1000, seed: int = 0, max_len: int = 128,
                        batch_size: int = 256) -> dict:
    """Fraction of positions (and of whole sequences) where the teacher-forced argmax is legal.

    Teacher-forced on one hop-shortest path per held-out pair; positions from the destination
    token (predicting the first move) to the one predicting end-of-sequence.
    """
    seqs, dropped = heldout_sequences(world, num_sequences, seed, max_len)
    tok = world.tokenizer
    tops = argmax_tokens(model, seqs, world, batch_size)
    legal_positions = total = legal_sequences = 0
    for seq, top in zip(seqs, tops):
        nodes, goal = walk_nodes(tok, seq), seq[1]
        ok = [is_legal(tok, nodes[t], goal, int(top[t])) for t in range(1, len(seq) - 1)]
        legal_positions += sum(ok)
        total += len(ok)
        legal_sequences += all(ok)
    return {"validity": legal_positions / total if total else None,
            "sequence_validity": legal_sequences / len(seqs) if seqs else None,
            "positions": total, "sequences": len(seqs), "dropped_too_long": dropped}


def state_probe(model, world, num_sequences: int = 2000, seed: int = 0, max_len: int = 128, epochs: int = 100,
                lr: float = 0.01, batch_size: int = 256) -> dict:
    """Test accuracy of a linear probe from final hidden states to the current node.

    States at every position from the destination token (current node = origin) to the last move,
    teacher-forced on held-out shortest paths; a seeded 80/20 split of the states; multinomial
    logistic regression (one linear layer, cross-entropy, Adam at ``lr``, ``epochs`` passes in
    minibatches of 2,048, as in Vafa et al.'s probe_test; more passes when that makes fewer than
    ``MIN_PROBE_STEPS`` updates). ``majority`` is the accuracy of always
    predicting the most frequent training node.
    """
    seqs, dropped = heldout_sequences(world, num_sequences, seed, max_len)
    tok = world.tokenizer
    positions, labels = [], []
    for seq in seqs:
        nodes = walk_nodes(tok, seq)
        ps = [t for t in range(1, len(seq)) if nodes[t] >= 0]
        positions.append(ps)
        labels.extend(nodes[t] for t in ps)
    device = model_device(model)  # the probe trains where the model runs (a GPU for Manhattan-sized worlds)
    X = torch.from_numpy(hidden_at(model, seqs, positions, world, batch_size)).to(device)
    # classes are the nodes that occur (Vafa's LabelEncoder): on a large map most nodes never do
    nodes, y = torch.unique(torch.tensor(labels, dtype=torch.long), return_inverse=True)
    y = y.to(device)
    if len(y) < 5:
        return {"accuracy": None, "states": len(y), "sequences": len(seqs)}
    order = np.random.default_rng([seed, 19]).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = torch.from_numpy(order[:cut]).to(device), torch.from_numpy(order[cut:]).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(X.shape[1], len(nodes)).to(device)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        # at least MIN_PROBE_STEPS updates: on few states, a few epochs leave even a perfect code unfit
        for _ in range(max(epochs, -(-MIN_PROBE_STEPS // -(-len(train) // 2048)))):
            perm = train[torch.randperm(len(train)).to(device)]
            for i in range(0, len(perm), 2048):
                batch = perm[i:i + 2048]
                loss = torch.nn.functional.cross_entropy(probe(X[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        accuracy = (probe(X[test]).argmax(-1) == y[test]).float().mean().item()
    majority_node = torch.bincount(y[train], minlength=len(nodes)).argmax()
    return {"accuracy": accuracy, "majority": (y[test] == majority_node).float().mean().item(),
            "train_states": len(train), "test_states": len(test), "classes": len(nodes), "sequences": len(seqs),
            "dropped_too_long": dropped}


@torch.no_grad()
def sample_continuations(model, prefixes: list[list[int]], world, max_len: int, epsilon: float,
                         generator: torch.Generator, batch_size: int = 256) -> list[list[int]]:
    """One continuation per prefix, sampled at temperature 1 with an epsilon cutoff (tokens below
    ``epsilon`` are dropped unless they tie the most likely one, as in Hugging Face's
    ``epsilon_cutoff``), each until end-of-sequence (included) or until prefix + continuation
    reach ``max_len`` tokens. Prefixes of any lengths are decoded together (ds_mtp.generate)."""
    from ds_mtp.generate import generate

    tok = world.tokenizer
    out: list[list[int]] = []
    rows = max(1, min(batch_size, MAX_LOGITS_PER_BATCH // max(1, max_len * world.vocab_size)))
    for start in range(0, len(prefixes), rows):
        chunk = prefixes[start:start + rows]
        live = [i for i, p in enumerate(chunk) if len(p) < max_len]
        suffixes: list[list[int]] = [[] for _ in chunk]
        if live:
            lengths = [len(chunk[i]) for i in live]
            counts = [0] * len(live)

            def full(row: int, token: int) -> bool:
                counts[row] += 1
                return lengths[row] + counts[row] >= max_len

            generated = generate(model, [chunk[i] for i in live], max_len - min(lengths), temperature=1.0,
                                 epsilon=epsilon, generator=generator, eos_id=tok.eos_id, stop=full).tokens
            for i, tokens in zip(live, generated):
                suffixes[i] = tokens
        out.extend(suffixes)
    return out


def sample_suffixes(model, prefix: list[int], world, num: int, max_len: int, epsilon: float,
                    generator: torch.Generator) -> list[list[int]]:
    """``num`` continuations of one prefix (see ``sample_continuations``)."""
    return sample_continuations(model, [prefix] * num, world, max_len, epsilon, generator)


def accepts(probs: list[np.ndarray], epsilon: float) -> list[bool]:
    return [bool(np.all(p > epsilon)) for p in probs]


def continuation_probs(model, pairs: list[tuple[list[int], list[int]]], world, batch_size) -> list[np.ndarray]:
    """For each (prefix, continuation), the probability of each continuation token after the prefix."""
    full = token_probs(model, [list(p) + list(c) for p, c in pairs], world, batch_size)
    return [f[len(p) - 1:] for f, (p, _) in zip(full, pairs)]


class _TrialStates:
    """Draws states and same-length prefix pairs for the compression and distinction trials."""

    def __init__(self, world, rng, max_prefix_moves: int, max_len: int, room: int):
        self.world, self.rng, self.index = world, rng, WorldIndex(world)
        self.pairs = list(world.train_pairs) + list(world.heldout_pairs)
        self.max_prefix_moves, self.max_len, self.room = max_prefix_moves, max_len, room

    def state(self) -> tuple[int, int]:
        u, g = self.pairs[int(self.rng.integers(len(self.pairs)))]
        return int(u), int(g)

    def prefix_pair(self, s1, s2, distinct: bool) -> tuple[list[int], list[int]] | str:
        """Two prefixes of one length reaching s1 and s2 (uniform among the lengths both admit), or
        the reason there are none."""
        room = max(self.room, 1 + int(self.index.dist_to(s1[1])[s1[0]]))
        longest = min(self.max_prefix_moves, self.max_len - 2 - room)
        if longest < 1:
            return "no_room"
        lengths = sorted(self.index.prefix_lengths(*s1, longest) & self.index.prefix_lengths(*s2, longest))
        if not lengths:
            return "no_prefix"
        moves = lengths[int(self.rng.integers(len(lengths)))]
        for _ in range(20):
            p1 = self.index.backward_prefix(*s1, moves, self.rng)
            p2 = self.index.backward_prefix(*s2, moves, self.rng)
            if p1 != p2 or not distinct:
                return p1, p2
        return "no_prefix"


def compression_precision(model, world, num_trials: int = 100, num_suffixes: int = 30, epsilon: float = 0.01,
                          max_prefix_moves: int = 100, seed: int = 0, max_len: int = 128,
                          batch_size: int = 256) -> dict:
    """Fraction of trials in which every continuation the model samples after one prefix of a state
    is accepted after another prefix of the same state (Vafa et al.'s compression precision).
    All trials' continuations are sampled and scored together in batches."""
    rng = np.random.default_rng([seed, 23])
    gen = torch.Generator().manual_seed(seed)
    draw = _TrialStates(world, rng, max_prefix_moves, max_len, room=1)
    trials, skipped = [], {"no_room": 0, "no_prefix": 0}
    for _ in range(num_trials):
        s = draw.state()
        pair = draw.prefix_pair(s, s, distinct=True)
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            trials.append(pair)
    sampled = sample_continuations(model, [p1 for p1, _ in trials for _ in range(num_suffixes)], world, max_len,
                                   epsilon, gen, batch_size)
    probs = continuation_probs(model, [(p2, sampled[t * num_suffixes + j]) for t, (_, p2) in enumerate(trials)
                                       for j in range(num_suffixes)], world, batch_size)
    scores = [float(all(accepts(probs[t * num_suffixes:(t + 1) * num_suffixes], epsilon)))
              for t in range(len(trials))]
    return {"precision": float(np.mean(scores)) if scores else None, "trials": len(scores), "skipped": skipped,
            "epsilon": epsilon, "suffixes_per_trial": num_suffixes}


def true_boundary(tok, s1, s2, length: int) -> list[tuple[int, ...]]:
    """Vafa's Myhill-Nerode boundary of s1 against s2 up to ``length`` tokens: the shortest prefixes,
    invalid from s2, of the length-``length`` continuations valid from s1 but not from s2."""
    boundary: set[tuple[int, ...]] = set()

    @functools.lru_cache(maxsize=None)
    def extendable(node, goal, depth) -> bool:  # can a valid continuation from node run ``depth`` more tokens?
        if depth == 0 or node is None or node == goal:  # after the end token only the end token follows
            return True
        return any(extendable(tok.step(node, m), goal, depth - 1) for m in tok.legal_moves(node))

    def next_state(node, goal, token):
        if node is None:
            return "stop" if token == tok.eos_id else "dead"
        if token == tok.eos_id:
            return "stop" if node == goal else "dead"
        nxt = tok.step(node, token) if tok.is_move_token(token) else None
        return "dead" if nxt is None else nxt

    def walk(a, b, prefix):
        if len(prefix) == length:
            return
        options = [tok.eos_id] if a is None else tok.legal_next(a, s1[1])
        for token in options:
            na = next_state(a, s1[1], token)
            na = None if na == "stop" else na
            if not extendable(na, s1[1], length - len(prefix) - 1):
                continue
            nb = next_state(b, s2[1], token)
            if nb == "dead":
                boundary.add(tuple(prefix + [token]))
            else:
                walk(na, None if nb == "stop" else nb, prefix + [token])

    walk(s1[0], s2[0], [])
    return sorted(boundary)


def distinction(model, world, num_trials: int = 100, num_suffixes: int = 5, suffix_length: int = 5,
                epsilon: float = 0.01, max_prefix_moves: int = 100, seed: int = 0, max_len: int = 128,
                batch_size: int = 256) -> dict:
    """Vafa et al.'s distinction precision and recall over pairs of different states s1, s2.

    Precision: for each of ``num_suffixes`` continuations sampled after the s1 prefix, the model's
    boundary element is its shortest start that the model rejects after the s2 prefix; precision =
    fraction of the distinct elements that are truly valid from s1 and invalid from s2 (1 when
    the model rejects nothing). Recall: fraction of the true boundary (``true_boundary``) that the
    model accepts after the s1 prefix and rejects after the s2 prefix (1 when it is empty).
    """
    tok = world.tokenizer
    rng = np.random.default_rng([seed, 29])
    gen = torch.Generator().manual_seed(seed)
    draw = _TrialStates(world, rng, max_prefix_moves, max_len, room=suffix_length)
    trials, skipped = [], {"no_room": 0, "no_prefix": 0}
    for _ in range(num_trials):
        s1 = draw.state()
        s2 = draw.state()
        while s2 == s1:
            s2 = draw.state()
        pair = draw.prefix_pair(s1, s2, distinct=False)
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            trials.append((s1, s2, *pair))
    k = num_suffixes
    sampled = sample_continuations(model, [p1 for _, _, p1, _ in trials for _ in range(k)], world, max_len,
                                   epsilon, gen, batch_size)
    after_p2 = continuation_probs(model, [(p2, sampled[t * k + j]) for t, (_, _, _, p2) in enumerate(trials)
                                          for j in range(k)], world, batch_size)
    boundaries = [[list(b) for b in true_boundary(tok, s1, s2, suffix_length)] for s1, s2, _, _ in trials]
    queries = [(p, b) for (_, _, p1, p2), bound in zip(trials, boundaries) for b in bound for p in (p1, p2)]
    accepted = accepts(continuation_probs(model, queries, world, batch_size), epsilon)
    offset = 0
    precisions, recalls = [], []
    for t, (s1, s2, _, _) in enumerate(trials):
        model_boundary = set()
        for suffix, probs in zip(sampled[t * k:(t + 1) * k], after_p2[t * k:(t + 1) * k]):
            below = np.nonzero(probs <= epsilon)[0]
            if below.size:
                model_boundary.add(tuple(suffix[:below[0] + 1]))
        if model_boundary:
            hits = sum(suffix_valid(tok, s1[0], s1[1], b) and not suffix_valid(tok, s2[0], s2[1], b)
                       for b in model_boundary)
            precisions.append(hits / len(model_boundary))
        else:
            precisions.append(1.0)
        # queries alternate (after p1, after p2) per boundary element
        told_apart = [accepted[offset + 2 * i] and not accepted[offset + 2 * i + 1] for i in range(len(boundaries[t]))]
        offset += 2 * len(boundaries[t])
        recalls.append(sum(told_apart) / len(told_apart) if told_apart else 1.0)
    boundary_sizes = [len(b) for b in boundaries]
    return {"precision": float(np.mean(precisions)) if precisions else None,
            "recall": float(np.mean(recalls)) if recalls else None, "trials": len(precisions), "skipped": skipped,
            "mean_boundary_size": float(np.mean(boundary_sizes)) if boundary_sizes else None,
            "epsilon": epsilon, "suffix_length": suffix_length, "suffixes_per_trial": num_suffixes}


@torch.no_grad()
def detour_robustness(model, world, detour_prob: float, detour_type: str = "random_valid", num_trials: int = 100,
                      seed: int = 0, max_len: int = 128, batch_size: int = 256) -> dict:
    """Success rate of greedy decoding from ``src tgt`` on held-out pairs when, at each step away
    from the destination, a detour is forced with probability ``detour_prob``.

    The detour is a legal move from which the destination stays reachable within the length
    budget: a random one other than the model's argmax (``random_valid``), the one the model
    finds least likely (``least_likely``), or its most likely one other than the argmax
    (``second_most_likely``). Success = every move legal and end-of-sequence at the destination
    within ``max_len`` tokens.
    """
    from ds_mtp.experiments.evaluate.paths import select_pairs

    if detour_type not in DETOUR_TYPES:
        raise ValueError(f"unknown detour type {detour_type!r} (expected one of {DETOUR_TYPES})")
    tok, index = world.tokenizer, WorldIndex(world)
    rng = np.random.default_rng([seed, 31, int(detour_prob * 1e6), DETOUR_TYPES.index(detour_type)])
    pairs = select_pairs(world.heldout_pairs, num_trials, seed)
    successes = detours = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        seqs = [[s, t] for s, t in batch]
        node = [s for s, _ in batch]
        outcome: list[bool | None] = [None] * len(batch)
        while any(o is None for o in outcome):
            live = [i for i, o in enumerate(outcome) if o is None]
            if len(seqs[live[0]]) >= max_len:  # all live rows have one length: the budget is spent
                for i in live:
                    outcome[i] = False
                break
            probs = last_probs(model, [seqs[i] for i in live], world, batch_size).numpy()
            for row, i in enumerate(live):
                p, goal = probs[row], batch[i][1]
                choice = int(p.argmax())
                remaining = max_len - len(seqs[i]) - 1  # tokens left after this one
                if node[i] != goal and rng.random() < detour_prob:
                    dist = index.dist_to(goal)
                    options = [m for m in tok.legal_moves(node[i])
                               if 0 <= dist[tok.step(node[i], m)] <= remaining - 1]
                    if options:
                        detours += 1
                        others = [m for m in options if m != choice]
                        if detour_type == "least_likely":
                            choice = min(options, key=lambda m: p[m])
                        elif not others:
                            choice = options[0]
                        elif detour_type == "random_valid":
                            choice = others[int(rng.integers(len(others)))]
                        else:
                            choice = max(others, key=lambda m: p[m])
                seqs[i].append(choice)
                if choice == tok.eos_id:
                    outcome[i] = node[i] == goal
                elif not is_legal(tok, node[i], goal, choice):
                    outcome[i] = False
                else:
                    node[i] = tok.step(node[i], choice)
        successes += sum(bool(o) for o in outcome)
    return {"success": successes / len(pairs) if pairs else None, "trials": len(pairs), "detours": detours,
            "detour_prob": detour_prob, "detour_type": detour_type}
