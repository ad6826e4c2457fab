"""Path decoding metrics (the LSE-MTP paper): success, illegal edge, wrong target, invalid format.

For each held-out pair the model decodes from the prompt ``src tgt``, greedily (temperature 0) or
by seeded sampling. Each sequence gets one outcome, decided by its first non-legal event:

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

from ds_mtp.evaluate import model_device

OUTCOMES = ("success", "illegal_edge", "wrong_target", "invalid_format")


def choose_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: argmax at temperature 0, else a sample from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def select_pairs(pairs, max_pairs: int | None, seed: int):
    """All pairs, or a seeded random subset of ``max_pairs`` (the stored list is sorted by origin)."""
    if max_pairs is None or max_pairs >= len(pairs):
        return list(pairs)
    rng = np.random.default_rng([seed, 7])
    return [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]


@torch.no_grad()
def decode_pairs(model, world, pairs, temperature: float = 0.0, seed: int = 0, batch_size: int = 256,
                 max_moves: int | None = None) -> list[dict]:
    """Decode every pair; one record per pair: outcome, generated tokens, walk."""
    tok = world.tokenizer
    max_moves = world.graph.num_nodes - 1 if max_moves is None else max_moves
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    records = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        tokens = torch.tensor([[s, t] for s, t in batch], dtype=torch.long, device=device)
        current = [s for s, _ in batch]
        outcome: list[str | None] = [None] * len(batch)
        walks = [[s] for s, _ in batch]
        generated: list[list[int]] = [[] for _ in batch]
        active = list(range(len(batch)))  # rows still decoding; finished rows leave the batch
        for _ in range(max_moves + 1):  # up to max_moves moves, then one more chance to stop
            nxt = choose_tokens(model.logits(tokens)[:, -1, :], temperature, generator)
            still = []
            for r, (i, token) in enumerate(zip(active, nxt.tolist())):
                generated[i].append(token)
                target = batch[i][1]
                if token == tok.eos_id:
                    outcome[i] = "success" if current[i] == target else "wrong_target"
                elif not tok.is_move_token(token):
                    outcome[i] = "invalid_format"
                else:
                    reached = tok.step(current[i], token)
                    if reached is None:
                        outcome[i] = "illegal_edge"
                    else:
                        current[i] = reached
                        walks[i].append(reached)
                if outcome[i] is None:
                    still.append(r)
            if not still:
                break
            keep = torch.tensor(still, device=tokens.device)
            tokens = torch.cat([tokens[keep], nxt[keep, None]], dim=1)
            active = [active[r] for r in still]
        for i, (s, t) in enumerate(batch):
            records.append({"pair": (s, t), "outcome": outcome[i] or "wrong_target",
                            "unterminated": outcome[i] is None, "tokens": generated[i], "walk": walks[i]})
    return records


def evaluate_paths(model, world, max_pairs: int | None = None, temperature: float = 0.0, seed: int = 0,
                   batch_size: int = 256, max_moves: int | None = None) -> dict:
    """Rates and counts of the four outcomes over the held-out pairs (see the module docstring)."""
    pairs = select_pairs(world.heldout_pairs, max_pairs, seed)
    records = decode_pairs(model, world, pairs, temperature, seed, batch_size, max_moves)
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    n = len(records)
    result = {o: counts[o] / n if n else float("nan") for o in OUTCOMES}
    result.update({"pairs": n, "counts": counts, "unterminated": sum(r["unterminated"] for r in records),
                   "temperature": temperature,
                   "max_moves": world.graph.num_nodes - 1 if max_moves is None else max_moves})
    return result
