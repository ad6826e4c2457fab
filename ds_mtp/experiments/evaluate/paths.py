"""Path decoding metrics (the LSE-MTP paper): success, illegal edge, wrong target, invalid format.

For each held-out pair the model decodes from the prompt ``src tgt``, greedily (temperature 0) or
by seeded sampling, up to ``max_moves + 1`` tokens. Each sequence gets one outcome under each of two
definitions.

The official one (the default names; the paper's ``test_accuracy.py``, ``parse_generated_path`` and
``validate_path``) reads the tokens up to the first end-of-sequence or ``<pad>``, keeps only the move
tokens (any other token, such as a node token, is skipped) and walks them:

- ``success``: the walk reaches the target (its first arrival; what follows does not count);
- ``illegal_edge``: a move that is not an out-edge of the current node, before any arrival (the
  script's "disconnected"; also a sequence with no move at all, which the script counts so);
- ``wrong_target``: the moves end (end-of-sequence, ``<pad>`` or the budget) away from the target;
- ``invalid_format``: never, since the prompt is always well formed (the script's invalid format is
  an unparsable prompt); the key stays for the strict definition's shape.

The strict one (``strict``; ds-mtp's own) decides on the first non-legal event:

- ``success``: a walk of legal moves that ends with end-of-sequence at the target;
- ``illegal_edge``: the first move token that is not an out-edge of the current node;
- ``invalid_format``: a token that is not a move where a move (or EOS) is expected (a node token,
  ``<pad>``);
- ``wrong_target``: end-of-sequence at another node, or no end-of-sequence within ``max_moves``
  legal moves (counted also as ``unterminated``).

``max_moves`` defaults to ``num_nodes - 1``: a simple path never needs more, and the training walks
of the path datasets are no longer (random walks: pass their ``max_steps``).
"""

from __future__ import annotations

import numpy as np
import torch


OUTCOMES = ("success", "illegal_edge", "wrong_target", "invalid_format")


def select_pairs(pairs, max_pairs: int | None, seed: int):
    """All pairs (``max_pairs`` None or 0), or a seeded random subset of ``max_pairs`` (the stored list is
    sorted by origin)."""
    if not max_pairs or max_pairs >= len(pairs):
        return list(pairs)
    rng = np.random.default_rng([seed, 7])
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]


class OfficialOutcome:
    """The outcome of test_accuracy.py for one decoded sequence, fed one generated token at a time."""

    def __init__(self, tok, source: int, target: int):
        self.tok, self.node, self.target = tok, source, target
        self.moved, self.outcome = False, None

    def feed(self, token: int) -> None:
        if self.outcome is not None:
            return
        if token in (self.tok.eos_id, self.tok.pad_id):  # the script cuts the text there
            self.finish()
        elif self.tok.is_move_token(token):
            reached = self.tok.step(self.node, token)
            if reached is None:
                self.outcome = "illegal_edge"
            else:
                self.node, self.moved = reached, True
                if reached == self.target:
                    self.outcome = "success"
        # any other token (a node token) is skipped by parse_generated_path

    def finish(self) -> None:
        """The moves have ended without a decision: no move at all is "disconnected", else a wrong target."""
        if self.outcome is None:
            self.outcome = "wrong_target" if self.moved else "illegal_edge"


class StrictOutcome:
    """ds-mtp's strict outcome: the first non-legal token decides, and success needs end-of-sequence at the
    target. ``walk`` is the nodes visited."""

    def __init__(self, tok, source: int, target: int):
        self.tok, self.target = tok, target
        self.walk, self.outcome = [source], None

    def feed(self, token: int) -> None:
        if self.outcome is not None:
            return
        if token == self.tok.eos_id:
            self.outcome = "success" if self.walk[-1] == self.target else "wrong_target"
        elif not self.tok.is_move_token(token):
            self.outcome = "invalid_format"
        else:
            reached = self.tok.step(self.walk[-1], token)
            if reached is None:
                self.outcome = "illegal_edge"
            else:
                self.walk.append(reached)


def judge(tok, source: int, target: int, generated: list[int]) -> tuple[str, str | None]:
    """(official outcome, strict outcome or None when undecided: unterminated) of a generated token list."""
    official, strict = OfficialOutcome(tok, source, target), StrictOutcome(tok, source, target)
    for token in generated:
        official.feed(token)
        strict.feed(token)
    official.finish()
    return official.outcome, strict.outcome


@torch.no_grad()
def decode_pairs(model, world, pairs, temperature: float = 0.0, seed: int = 0, batch_size: int = 256,
                 max_moves: int | None = None) -> list[dict]:
    """Decode every pair; one record per pair: ``outcome`` (official), ``outcome_strict``, ``unterminated``
    (strict: no decision within the budget), the generated tokens and the strict walk. A sequence is decoded
    (ds_mtp.generate, with the KV cache of an MTPModel) until both definitions have decided, or for
    max_moves + 1 tokens."""
    from ds_mtp.generate import generate

    tok = world.tokenizer
    max_moves = world.graph.num_nodes - 1 if max_moves is None else max_moves
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    records = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        official = [OfficialOutcome(tok, s, t) for s, t in batch]
        strict = [StrictOutcome(tok, s, t) for s, t in batch]

        def decided(row: int, token: int) -> bool:
            official[row].feed(token)
            strict[row].feed(token)
            return official[row].outcome is not None and strict[row].outcome is not None

        # up to max_moves moves, then one more chance to stop
        generated = generate(model, [[s, t] for s, t in batch], max_moves + 1, temperature=temperature,
                             generator=generator, stop=decided).tokens
        for i, (s, t) in enumerate(batch):
            official[i].finish()
            records.append({"pair": (s, t), "outcome": official[i].outcome,
                            "outcome_strict": strict[i].outcome or "wrong_target",
                            "unterminated": strict[i].outcome is None, "tokens": generated[i],
                            "walk": strict[i].walk})
    return records


def outcome_rates(outcomes: list[str]) -> dict:
    """The share and count of each of OUTCOMES."""
    counts = {o: sum(x == o for x in outcomes) for o in OUTCOMES}
    n = len(outcomes)
    return {**{o: counts[o] / n if n else float("nan") for o in OUTCOMES}, "counts": counts}


def evaluate_paths(model, world, max_pairs: int | None = None, temperature: float = 0.0, seed: int = 0,
                   batch_size: int = 256, max_moves: int | None = None) -> dict:
    """Rates and counts of the four outcomes over the held-out pairs (``max_pairs`` None or 0: all of them, as
    test_accuracy.py decodes every line of its held-out file): the official definition at the top level, the
    strict one under ``strict`` (see the module docstring)."""
    pairs = select_pairs(world.heldout_pairs, max_pairs, seed)
    records = decode_pairs(model, world, pairs, temperature, seed, batch_size, max_moves)
    result = outcome_rates([r["outcome"] for r in records])
    result.update({"strict": outcome_rates([r["outcome_strict"] for r in records]), "pairs": len(records),
                   "unterminated": sum(r["unterminated"] for r in records), "temperature": temperature,
                   "max_moves": world.graph.num_nodes - 1 if max_moves is None else max_moves})
    return result
