"""Hostfiles (DeepSpeed's ``HOST slots=N`` format) and the ``--include`` / ``--exclude`` filters.

DeepSpeed itself silently falls back to the local node when the hostfile is missing and reports a
bad line only as a traceback from every launcher; here each problem is one line naming the file
and the line number, found before anything starts.
"""

from __future__ import annotations

import re
from pathlib import Path

from ds_mtp.errors import UserError

_HOST_LINE = re.compile(r"^(?P<host>[^\s#=:@,]+)\s+slots\s*=\s*(?P<slots>\S+)\s*$")


def parse_hostfile_text(text: str, where: str = "hostfile") -> dict[str, int]:
    """``{host: slots}`` in file order. Blank lines and ``#`` comments (whole-line or trailing) are skipped."""
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise UserError(f"{where} line {number}: expected 'HOST slots=N', got '{raw.strip()}'")
        host, slots_text = match["host"], match["slots"]
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise UserError(f"{where} line {number}: slots must be a positive integer, got '{slots_text}'")
        if host in hosts:
            raise UserError(f"{where} line {number}: host '{host}' is listed twice (first on line {first_line[host]})")
        hosts[host] = int(slots_text)
        first_line[host] = number
    if not hosts:
        raise UserError(f"{where} lists no hosts (one 'HOST slots=N' line per node)")
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hostfile not found: {path}")
    return parse_hostfile_text(path.read_text(), where=f"hostfile {path}")


def _parse_filter(spec: str, hosts: dict[str, int], flag: str) -> dict[str, list[int] | None]:
    """``NAME[:SLOT[,SLOT...]][@NAME...]`` → {host: slot indices, or None for the whole host}."""
    chosen: dict[str, list[int] | None] = {}
    for part in spec.split("@"):
        name, colon, slot_list = part.partition(":")
        if not name:
            raise UserError(f"{flag} '{spec}': empty host name (the form is HOST[:SLOT,...][@HOST...])")
        if name not in hosts:
            raise UserError(f"{flag} '{spec}': host '{name}' is not in the hostfile ({', '.join(hosts)})")
        if not colon:
            chosen[name] = None
            continue
        slots = []
        for item in slot_list.split(","):
            if not item.isdigit() or int(item) >= hosts[name]:
                raise UserError(f"{flag} '{spec}': '{item}' is not a slot of {name} (0..{hosts[name] - 1})")
            slots.append(int(item))
        if name in chosen and chosen[name] is None:
            continue  # the whole host was already named
        chosen[name] = sorted(set((chosen.get(name) or []) + slots))
    return chosen


def select_slots(hosts: dict[str, int], include: str = "", exclude: str = "", num_nodes: int = 0,
                 slots_per_node: int = 0) -> dict[str, list[int]]:
    """The slots a launch uses: {host: [slot indices]} in hostfile order, as DeepSpeed will resolve them."""
    if include and exclude:
        raise UserError("--include and --exclude cannot be combined")
    if (include or exclude) and (num_nodes or slots_per_node):
        raise UserError("--include/--exclude cannot be combined with --num-nodes or --nproc (DeepSpeed refuses it)")
    if include:
        chosen = _parse_filter(include, hosts, "--include")
        active = {h: (list(range(hosts[h])) if chosen[h] is None else chosen[h]) for h in hosts if h in chosen}
    else:
        dropped = _parse_filter(exclude, hosts, "--exclude") if exclude else {}
        active = {}
        for host, slots in hosts.items():
            if host in dropped and dropped[host] is None:
                continue
            kept = [s for s in range(slots) if s not in (dropped.get(host) or [])]
            if kept:
                active[host] = kept
    if num_nodes:
        if num_nodes > len(active):
            raise UserError(f"--num-nodes {num_nodes}: the hostfile has only {len(active)} node(s)")
        active = dict(list(active.items())[:num_nodes])
    if slots_per_node:
        short = [h for h, s in active.items() if len(s) < slots_per_node]
        if short:
            raise UserError(f"--nproc {slots_per_node} per node: {short[0]} has only {len(active[short[0]])} slot(s)")
        active = {h: s[:slots_per_node] for h, s in active.items()}
    if not active:
        raise UserError("--exclude leaves no slot to run on")
    return active
