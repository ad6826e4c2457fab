"""Validity check of text sequences against a graph (``ds-mtp world check``).

Each line is one sequence, ``origin dest move … end`` in the direction format (Vafa et al.) or
``src tgt inc_Δ … <eos>`` in the increment format. A line is classified by its first decisive
token, like the decoding metrics:

- ``valid``: legal moves, then the end token at the destination (nothing after it);
- ``illegal_turn``: a move that is not an out-edge of the current node;
- ``wrong_end``: the end token away from the destination;
- ``unterminated``: only legal moves and no end token (e.g. a sample cut at the length limit);
- ``invalid_format``: an unknown token, an origin/destination that is not a node, a non-move
  token where a move is expected, or tokens after the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from ds_mtp.errors import UserError
from ds_mtp.experiments.worlds.graphs import Graph, from_edges_file, utf8_lines
from ds_mtp.experiments.worlds.tokenize import FORMATS, PathTokenizer, make_tokenizer

CATEGORIES = ("valid", "illegal_turn", "wrong_end", "unterminated", "invalid_format")


def classify(tokenizer: PathTokenizer, words: list[str]) -> str:
    """The category of one whitespace-split sequence."""
    ids = [tokenizer.token_id.get(w) for w in words]
    n = tokenizer.num_nodes
    if len(ids) < 2 or ids[0] is None or ids[1] is None or ids[0] >= n or ids[1] >= n:
        return "invalid_format"
    node, target = ids[0], ids[1]
    for i, tok in enumerate(ids[2:], 2):
        if tok == tokenizer.eos_id:
            if i != len(ids) - 1:
                return "invalid_format"
            return "valid" if node == target else "wrong_end"
        if tok is None or not tokenizer.is_move_token(tok):
            return "invalid_format"
        nxt = tokenizer.step(node, tok)
        if nxt is None:
            return "illegal_turn"
        node = nxt
    return "unterminated"


def load_check_graph(graph_path: str | Path) -> Graph:
    """An edges file, or a world directory made by ``make_world`` (its world.json graph)."""
    graph_path = Path(graph_path)
    if graph_path.is_dir():
        world_file = graph_path / "world.json"
        if not world_file.is_file():
            raise UserError(f"{graph_path} is a directory without world.json (pass an edges file or a world directory)")
        return Graph.from_json(json.loads(world_file.read_text())["graph"])
    return from_edges_file(graph_path)


def check_sequences(edges_path: str | Path, fmt: str, file: str | Path) -> dict:
    """Counts of each category (and ``total``) over the non-empty lines of ``file``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    tokenizer = make_tokenizer(load_check_graph(edges_path), fmt)
    file = Path(file)
    if not file.is_file():
        raise UserError(f"sequence file not found: {file}")
    counts = dict.fromkeys(CATEGORIES, 0)
    for _, line in utf8_lines(file):
        words = line.split()
        if words:
            counts[classify(tokenizer, words)] += 1
    counts["total"] = sum(counts[c] for c in CATEGORIES)
    return counts
