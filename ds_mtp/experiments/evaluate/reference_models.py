"""Reference models computed from the world itself: baselines for the metrics and test fixtures.

- ``LegalUniformOracle``: uniform probability on the legal next tokens of the true state (the
  moves out of the current node, plus end-of-sequence at the destination). A perfect world model
  that is *not* a planner: it need not reach the destination.
- ``ShortestPathOracle``: all probability on the first step of a hop-shortest path to the
  destination (end-of-sequence there): decodes every reachable pair successfully.
- ``UniformModel``: uniform over the whole vocabulary, whatever the input.

The oracles' hidden state is the one-hot true state (current node, destination), so states of
equal world state are identical and others orthogonal in the node part. Positions whose prefix is
not a legal walk (after an illegal or non-move token, or after end-of-sequence) get uniform logits;
at a node without moves away from its destination (no legal token) the legal oracle puts all
mass on ``<pad>``.
"""

from __future__ import annotations

import numpy as np
import torch

from ds_mtp.experiments.worlds.datasets import next_hop_towards

NEG = -1e9  # a finite "impossible": softmax gives exactly 0 without NaNs from -inf arithmetic


class _StateTracker:
    """Shared state tracking: per position, the true (current node, destination), or -1 if broken."""

    def __init__(self, world):
        self.world = world
        self.tok = world.tokenizer
        self.n = world.graph.num_nodes
        self.V = world.vocab_size
        self.device = torch.device("cpu")
        self._cache: dict[int, dict[tuple, list[int]]] = {}

    def states(self, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[B, T] current node and destination after each prefix (-1: no state: prompt or broken)."""
        toks = tokens.cpu().numpy()
        B, T = toks.shape
        current = np.full((B, T), -1, dtype=np.int64)
        target = np.full((B, T), -1, dtype=np.int64)
        for b in range(B):
            nodes = self._row_states(tuple(toks[b].tolist()))
            current[b] = nodes
            if T >= 2:
                target[b] = np.where(np.asarray(nodes) >= 0, toks[b, 1], -1)
        return current, target

    def _row_states(self, row: tuple) -> list[int]:
        # decoding extends each row by one token per call: reuse the states of the row minus its
        # last token, cached from the previous call (only the two latest lengths are kept)
        T = len(row)
        for length in [k for k in self._cache if k < T - 1 or k > T]:
            del self._cache[length]
        previous = self._cache.get(T - 1, {}).get(row[:-1])
        if previous is not None:
            node, tok = previous[-1], row[-1]
            nxt = self.tok.step(node, tok) if node >= 0 and self.tok.is_move_token(tok) else None
            states = previous + [-1 if nxt is None else nxt]
        else:
            states = [-1] * T
            if T >= 2 and row[0] < self.n and row[1] < self.n:
                node = row[0]
                states[1] = node
                for t in range(2, T):
                    node = self.tok.step(node, row[t]) if self.tok.is_move_token(row[t]) else None
                    if node is None:
                        break
                    states[t] = node
        self._cache.setdefault(T, {})[row] = states
        return states

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        current, target = self.states(tokens)
        B, T = current.shape
        h = torch.zeros(B, T, 2 * self.n + 1)
        ok = current >= 0
        b, t = np.nonzero(ok)
        h[b, t, current[ok]] = 1.0
        h[b, t, self.n + target[ok]] = 1.0
        h[~torch.from_numpy(ok)] = 0.0
        h[..., -1][~torch.from_numpy(ok)] = 1.0  # no state: a shared "unknown" direction
        return h


class LegalUniformOracle(_StateTracker):
    """Uniform over the legal next tokens of the true state."""

    def __init__(self, world):
        super().__init__(world)
        moves = torch.full((self.n, self.V), NEG)
        for u in range(self.n):
            legal = self.tok.legal_moves(u)
            if legal:
                moves[u, legal] = 0.0
        self.move_logits = moves

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        current, target = self.states(tokens)
        cur = torch.from_numpy(current)
        ok = cur >= 0
        out = torch.zeros(*cur.shape, self.V)
        out[ok] = self.move_logits[cur[ok]]
        at_goal = torch.from_numpy((current == target) & (current >= 0))
        out[..., self.tok.eos_id][at_goal] = 0.0
        # a node without moves, away from its destination, has no legal token: all mass on <pad>,
        # a token that is never legal, so the oracle accepts no continuation there
        dead = ok & (out.max(dim=-1).values < 0)
        out[..., self.tok.pad_id][dead] = 0.0
        return out


class ShortestPathOracle(_StateTracker):
    """All probability on a hop-shortest path's next step; end-of-sequence at the destination."""

    def __init__(self, world):
        super().__init__(world)
        self._next_hop: dict[int, np.ndarray] = {}

    def best_token(self, node: int, goal: int) -> int | None:
        if node == goal:
            return self.tok.eos_id
        if goal not in self._next_hop:
            self._next_hop[goal] = next_hop_towards(self.world.graph, goal)
        hop = int(self._next_hop[goal][node])
        return None if hop < 0 else self.tok.move_token(node, hop)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        current, target = self.states(tokens)
        out = torch.zeros(*current.shape, self.V)
        for b, t in zip(*np.nonzero(current >= 0)):
            best = self.best_token(int(current[b, t]), int(target[b, t]))
            if best is not None:
                out[b, t] = NEG
                out[b, t, best] = 0.0
        return out


class UniformModel:
    """Uniform over the vocabulary; its hidden state is a fixed random vector per input token."""

    def __init__(self, vocab_size: int, dim: int = 16, seed: int = 0):
        self.vocab_size = vocab_size
        self.embedding = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(seed))
        self.device = torch.device("cpu")

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab_size)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens.cpu()]
