"""Shared machinery of the world-model metrics: batched scoring, world lookups, prefix samplers.

Every metric feeds the model right-padded batches of token sequences no longer than
``max_length(model)``; the model is causal, so padding after a sequence never changes the scores
of its own positions.
"""

from __future__ import annotations

import numpy as np
import torch

from ds_mtp.experiments.evaluate import model_device

# Score at most this many logits (batch x length x vocabulary) per forward pass, so that a large
# vocabulary (Manhattan: ~4,600 tokens) does not blow up memory.
MAX_LOGITS_PER_BATCH = 32_000_000


def max_length(model, default: int) -> int:
    """The longest token sequence the model accepts: ``model.cfg.max_seq_len``, capped by ``default``."""
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    return min(int(limit), int(default)) if limit else int(default)


def batches(seqs: list[list[int]], batch_size: int, vocab_size: int):
    """Consecutive (start, chunk) slices of ``seqs`` whose padded logits stay within the memory cap."""
    start = 0
    while start < len(seqs):
        longest = max(len(s) for s in seqs[start:start + batch_size])
        size = max(1, min(batch_size, MAX_LOGITS_PER_BATCH // max(1, longest * vocab_size)))
        longest = max(len(s) for s in seqs[start:start + size])
        yield start, seqs[start:start + size], longest
        start += size


def pad(seqs: list[list[int]], length: int, pad_id: int, device) -> torch.Tensor:
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def last_probs(model, prefixes: list[list[int]], world, batch_size: int = 256) -> torch.Tensor:
    """[N, V] next-token probabilities after each prefix (float32, CPU)."""
    tok, device = world.tokenizer, model_device(model)
    out = []
    for _, chunk, longest in batches(prefixes, batch_size, world.vocab_size):
        logits = model.logits(pad(chunk, longest, tok.pad_id, device))
        last = torch.tensor([len(s) - 1 for s in chunk], device=logits.device)
        picked = logits[torch.arange(len(chunk), device=logits.device), last]
        out.append(torch.softmax(picked.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, world.vocab_size)


@torch.no_grad()
def token_probs(model, seqs: list[list[int]], world, batch_size: int = 256) -> list[np.ndarray]:
    """Per sequence, the model's probability of each token given the tokens before it: ``len - 1`` values."""
    tok, device = world.tokenizer, model_device(model)
    out: list[np.ndarray] = []
    for _, chunk, longest in batches(seqs, batch_size, world.vocab_size):
        tokens = pad(chunk, longest, tok.pad_id, device)
        logp = torch.log_softmax(model.logits(tokens).float(), dim=-1)
        nxt = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].exp().cpu().numpy()
        out.extend(nxt[i, :len(s) - 1] for i, s in enumerate(chunk))
    return out


@torch.no_grad()
def argmax_tokens(model, seqs: list[list[int]], world, batch_size: int = 256) -> list[np.ndarray]:
    """Per sequence, the model's most likely next token at every position (``len`` values)."""
    tok, device = world.tokenizer, model_device(model)
    out: list[np.ndarray] = []
    for _, chunk, longest in batches(seqs, batch_size, world.vocab_size):
        top = model.logits(pad(chunk, longest, tok.pad_id, device)).argmax(-1).cpu().numpy()
        out.extend(top[i, :len(s)] for i, s in enumerate(chunk))
    return out


@torch.no_grad()
def hidden_at(model, seqs: list[list[int]], positions: list[list[int]], world, batch_size: int = 256) -> np.ndarray:
    """Hidden states [sum(len(p)), d] at the given positions of each sequence (float32)."""
    tok, device = world.tokenizer, model_device(model)
    out = []
    for start, chunk, longest in batches(seqs, batch_size, world.vocab_size):
        h = model.hidden(pad(chunk, longest, tok.pad_id, device)).float().cpu()
        for i in range(len(chunk)):
            out.append(h[i, positions[start + i]])
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; a zero vector has similarity 0 with everything."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = np.where((na > 0) & (nb > 0), na * nb, 1.0)
    return np.where((na > 0) & (nb > 0), (a * b).sum(1) / denom, 0.0)


def walk_nodes(tok, seq: list[int]) -> list[int]:
    """Current node after each prefix ``seq[:t+1]`` (-1 at t=0, where the destination is unknown,
    at end-of-sequence and after, and once the walk breaks)."""
    nodes = [-1] * len(seq)
    if len(seq) < 2:
        return nodes
    node = seq[0]
    nodes[1] = node
    for t in range(2, len(seq)):
        node = tok.step(node, seq[t]) if node >= 0 and tok.is_move_token(seq[t]) else -1
        nodes[t] = node
    return nodes


def is_legal(tok, node: int, goal: int, token: int) -> bool:
    """Whether ``token`` is a legal next token in state (node, goal)."""
    if token == tok.eos_id:
        return node == goal
    return tok.is_move_token(token) and tok.step(node, token) is not None


def suffix_valid(tok, node: int, goal: int, suffix) -> bool:
    """Whether the token ``suffix`` is a legal continuation from state (node, goal); after the end
    token only the end token is legal (the world has stopped)."""
    for token in suffix:
        if node is None:
            if token != tok.eos_id:
                return False
        elif token == tok.eos_id:
            if node != goal:
                return False
            node = None
        else:
            node = tok.step(node, token) if tok.is_move_token(token) else None
            if node is None:
                return False
    return True


class WorldIndex:
    """Hop distances to any node (cached, computed in C by scipy), predecessors, shortest-path prefixes."""

    def __init__(self, world, cache_size: int = 4096):
        from scipy.sparse import csr_matrix

        self.world, self.graph, self.tok = world, world.graph, world.tokenizer
        n = self.graph.num_nodes
        edges = np.asarray(self.graph.edges, dtype=np.int64).reshape(-1, 2)
        # reversed graph: a BFS from v over it gives every node's distance *to* v
        self._reverse = csr_matrix((np.ones(len(edges)), (edges[:, 1], edges[:, 0])), shape=(n, n))
        self._dist: dict[int, np.ndarray] = {}
        self._walks: dict[tuple[int, int], list[np.ndarray]] = {}
        self._cache_size = cache_size
        self.predecessors = [[] for _ in range(n)]
        for u, v in self.graph.edges:
            self.predecessors[v].append(u)

    def dist_to(self, target: int) -> np.ndarray:
        """Hop distance from every node to ``target``; -1 where unreachable."""
        d = self._dist.get(target)
        if d is None:
            from scipy.sparse.csgraph import shortest_path

            raw = shortest_path(self._reverse, unweighted=True, indices=target)
            d = np.where(np.isinf(raw), -1, raw).astype(np.int64)
            if len(self._dist) >= self._cache_size:
                self._dist.pop(next(iter(self._dist)))
            self._dist[target] = d
        return d

    def backward_counts(self, goal: int, max_moves: int) -> list[np.ndarray]:
        """``W[m][v]``, proportional to the number of backward walks of m moves from v (to
        predecessors) that never visit ``goal``; each level is scaled to max 1 (only ratios within a
        level matter, and raw counts overflow)."""
        key = (goal, max_moves)
        counts = self._walks.get(key)
        if counts is None:
            allowed = np.ones(self.graph.num_nodes)
            allowed[goal] = 0.0
            counts = [allowed]
            for _ in range(max_moves):
                level = allowed * (self._reverse @ counts[-1])
                top = level.max()
                counts.append(level / top if top > 0 else level)
            if len(self._walks) >= 64:
                self._walks.pop(next(iter(self._walks)))
            self._walks[key] = counts
        return counts

    def prefix_lengths(self, node: int, goal: int, max_moves: int) -> set[int]:
        """Move counts 1..max_moves for which a backward walk from ``node`` avoiding ``goal`` exists."""
        counts = self.backward_counts(goal, max_moves)
        return {m for m in range(1, max_moves + 1) if counts[m][node] > 0}

    def backward_prefix(self, node: int, goal: int, moves: int, rng: np.random.Generator) -> list[int] | None:
        """Vafa et al.'s prefix sampler, conditioned to succeed: a random walk of ``moves`` steps
        *backwards* from ``node``, written forwards as ``origin goal move…`` ending at ``node``,
        drawn uniformly among the walks that never visit ``goal`` (a path model is trained to stop
        there) and never get stuck at a node without predecessors. Vafa's sampler takes a uniform
        predecessor per step and fails on such walks; on sparse graphs (ER) nearly all long ones do.
        None when no such walk exists."""
        counts = self.backward_counts(goal, moves)
        if node == goal or counts[moves][node] <= 0:
            return None
        walk = [node]
        for left in range(moves, 0, -1):
            preds = self.predecessors[walk[-1]]
            weights = np.array([counts[left - 1][p] for p in preds])
            walk.append(preds[int(rng.choice(len(preds), p=weights / weights.sum()))])
        walk.reverse()
        return [walk[0], goal] + [self.tok.move_token(a, b) for a, b in zip(walk, walk[1:])]

    def shortest_prefix(self, node: int, goal: int, rng: np.random.Generator, max_moves: int) -> list[int] | None:
        """A prefix of a hop-shortest path to ``goal`` that ends at ``node`` after 1..max_moves moves:
        a uniform origin among those with ``node`` on one of their shortest paths to ``goal``, then a
        uniformly random shortest walk from the origin to ``node``. None when there is no such origin."""
        to_node, to_goal = self.dist_to(node), self.dist_to(goal)
        if to_goal[node] < 0:
            return None
        ok = (to_node >= 1) & (to_node <= max_moves) & (to_goal == to_node + to_goal[node])
        origins = np.nonzero(ok)[0]
        if origins.size == 0:
            return None
        walk = [int(origins[rng.integers(origins.size)])]
        while walk[-1] != node:
            closer = [w for w in self.graph.successors(walk[-1]) if to_node[w] == to_node[walk[-1]] - 1]
            walk.append(closer[int(rng.integers(len(closer)))])
        return [walk[0], goal] + [self.tok.move_token(a, b) for a, b in zip(walk, walk[1:])]


def heldout_sequences(world, max_sequences: int | None, seed: int, max_len: int) -> tuple[list[list[int]], int]:
    """Token sequences of one hop-shortest path per held-out pair (a seeded subset of
    ``max_sequences`` pairs), dropping those longer than ``max_len``. Returns (sequences, dropped)."""
    from ds_mtp.experiments.evaluate.paths import select_pairs
    from ds_mtp.experiments.worlds.datasets import shortest_paths_by_source

    pairs = select_pairs(world.heldout_pairs, max_sequences, seed)
    paths = shortest_paths_by_source(world.graph, pairs)
    seqs = [world.tokenizer.encode(paths[p], p[1]) for p in pairs]
    kept = [s for s in seqs if len(s) <= max_len]
    return kept, len(seqs) - len(kept)
