"""Tokenizations of paths on a graph world.

Two formats share one vocabulary layout: node tokens first (token id == node id, so a node's token
is its number), then the move tokens, then the end-of-sequence token and ``<pad>``.

- ``increment`` (the LSE-MTP paper): ``src tgt inc_Δ … <eos>``, where Δ = next node id − current
  node id. The current node is never a token; it follows from ``src`` and the increments. Every Δ
  in ``[-(n-1), n-1] \\ {0}`` has a token, so a model can express an illegal step (a "shortcut"
  to a non-neighbour), which the Illegal Shortcut Probability measures.
- ``direction`` (Vafa et al.): ``origin dest DIR DIR … end``; each DIR follows the out-edge with
  that compass label. Needs a graph with edge labels (an edges file). A non-edge has no token.

Both describe a deterministic world whose state is (current node, destination): a move token is
legal at node u when it names an out-edge of u, and end-of-sequence is legal only at the
destination.
"""

from __future__ import annotations

from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds.graphs import Graph

FORMATS = ("increment", "direction")
COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
PAD = "<pad>"


class PathTokenizer:
    """Shared machinery: vocabulary, transitions table, encoding and decoding of paths."""

    format: str
    eos_token: str

    def __init__(self, graph: Graph, move_tokens: list[str]):
        self.graph = graph
        self.num_nodes = graph.num_nodes
        self.vocab: list[str] = list(graph.names) + move_tokens + [self.eos_token, PAD]
        self.token_id = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.token_id) != len(self.vocab):
            raise UserError("node names collide with move or special tokens")
        self.first_move = self.num_nodes
        self.eos_id = self.token_id[self.eos_token]
        self.pad_id = self.token_id[PAD]
        # transitions[u] maps each legal move token at u to the node it leads to
        self.transitions: list[dict[int, int]] = [{} for _ in range(self.num_nodes)]
        for u, v in graph.edges:
            self.transitions[u][self.move_token(u, v)] = v

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> dict:
        return {"pad": self.pad_id, "eos": self.eos_id, "bos": None, "unk": None}

    def is_move_token(self, token: int) -> bool:
        return self.first_move <= token < self.eos_id

    def move_token(self, u: int, v: int) -> int | None:
        """The token that steps from u to v, or None when the format cannot express it."""
        raise NotImplementedError

    def step(self, u: int, token: int) -> int | None:
        """The node reached by move ``token`` at ``u``, or None if it is not a legal move there."""
        return self.transitions[u].get(token)

    def legal_moves(self, u: int) -> list[int]:
        return list(self.transitions[u])

    def legal_next(self, u: int, target: int) -> list[int]:
        """Every legal next token in state (u, target): the moves, and EOS at the target."""
        moves = self.legal_moves(u)
        return moves + [self.eos_id] if u == target else moves

    def encode(self, path: list[int], target: int | None = None) -> list[int]:
        """``[src, tgt, move…, eos]`` for a walk ``path`` (target defaults to its last node)."""
        target = path[-1] if target is None else target
        tokens = [path[0], target]
        for u, v in zip(path, path[1:]):
            tok = self.move_token(u, v)
            if tok is None or self.step(u, tok) != v:
                raise ValueError(f"{self.graph.names[u]} -> {self.graph.names[v]} is not an edge")
            tokens.append(tok)
        tokens.append(self.eos_id)
        return tokens

    def decode(self, tokens: list[int]) -> tuple[int, int, list[int]]:
        """(src, tgt, walk) from a complete valid sequence; ValueError when it is not one."""
        tokens = list(tokens)
        if len(tokens) < 3 or tokens[0] >= self.num_nodes or tokens[1] >= self.num_nodes:
            raise ValueError("a sequence starts with two node tokens")
        src, tgt = tokens[0], tokens[1]
        walk = [src]
        for i, tok in enumerate(tokens[2:], 2):
            if tok == self.eos_id:
                if walk[-1] != tgt or i != len(tokens) - 1:
                    raise ValueError("end-of-sequence away from the destination or before the end")
                return src, tgt, walk
            nxt = self.step(walk[-1], tok) if self.is_move_token(tok) else None
            if nxt is None:
                raise ValueError(f"token {self.vocab[tok]!r} at position {i} is not a legal move")
            walk.append(nxt)
        raise ValueError("sequence has no end-of-sequence token")

    def to_text(self, tokens) -> str:
        return " ".join(self.vocab[int(t)] for t in tokens)

    def from_text(self, text: str) -> list[int]:
        try:
            return [self.token_id[t] for t in text.split()]
        except KeyError as e:
            raise ValueError(f"unknown token {e.args[0]!r}") from None


class IncrementTokenizer(PathTokenizer):
    format = "increment"
    eos_token = "<eos>"

    def __init__(self, graph: Graph):
        n = graph.num_nodes
        self.deltas = [d for d in range(-(n - 1), n) if d != 0]
        super().__init__(graph, [f"inc_{d}" for d in self.deltas])

    def move_token(self, u: int, v: int) -> int | None:
        d = v - u
        if d == 0 or abs(d) >= self.num_nodes:
            return None
        # deltas run -(n-1)..-1, 1..n-1: index of d is d + n - 1 for negatives, d + n - 2 for positives
        return self.first_move + (d + self.num_nodes - 1 if d < 0 else d + self.num_nodes - 2)


class DirectionTokenizer(PathTokenizer):
    format = "direction"
    eos_token = "end"

    def __init__(self, graph: Graph):
        if graph.labels is None:
            raise UserError("the direction format needs a graph with direction labels (an edges file)")
        found = set(graph.labels.values())
        self.directions = [d for d in COMPASS if d in found] + sorted(found - set(COMPASS))
        self._label_id = {d: i for i, d in enumerate(self.directions)}
        super().__init__(graph, list(self.directions))

    def move_token(self, u: int, v: int) -> int | None:
        label = self.graph.labels.get((u, v))
        return None if label is None else self.first_move + self._label_id[label]


def make_tokenizer(graph: Graph, fmt: str) -> PathTokenizer:
    if fmt == "increment":
        return IncrementTokenizer(graph)
    if fmt == "direction":
        return DirectionTokenizer(graph)
    raise UserError(f"unknown path format '{fmt}' (expected one of: {', '.join(FORMATS)})")
