"""Corpus readers: stream local files or a ``datasets`` dataset as resumable units of raw records.

Reading is split in two so the parent process stays cheap. The readers here only cut the input
into *units*, and the tokenizer workers read (``unit_records``), decode, parse and validate each
unit's records (``record_to_text``). A unit of a plain ``.txt`` / ``.jsonl`` file is just a byte
range cut at a line end: the parent seeks to every ``unit_bytes``-th byte and reads forward to the
next newline, and the worker opens the file and reads the range itself, so the corpus text never
passes through the parent. Inputs that cannot seek (``.jsonl.gz``, parquet, datasets,
``--doc-per-file``) hand their records over in the unit instead.

A unit's position (``source``, ``start``) lets a later run seek straight to it, which is what
makes sharding resumable. Unit boundaries depend only on the input bytes, never on timing or the
number of workers, so the output does not either. Units carry no line numbers: the parent, which
receives results in unit order, counts the records of each unit and so knows every record's
absolute line (or row) for messages.

Lines are split at ``\n`` only, in binary, as ``open(path, "rb")`` iterates them: a lone ``\r`` is
part of its line (``\r\n`` and trailing ``\r`` are stripped from ``.txt`` documents), a blank line
is a record (skipped as empty), and a last line without a newline is a record too.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ds_mtp.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
SKIP_REASONS = ("invalid_json", "missing_field", "not_text", "not_utf8", "empty", "too_long")
"""Why a record can be skipped (``duplicate`` is counted too, but is not a fault)."""

UNIT_BYTES = 1 << 20
"""About this many input bytes per unit of line-based files."""
UNIT_ROWS = 2048
"""Rows per unit of parquet files and datasets."""


@dataclass(frozen=True)
class Source:
    """One input: a file (``kind`` txt / txt-file / jsonl / jsonl.gz / parquet) or a dataset (``hf``)."""

    kind: str
    path: str
    split: str = ""

    def describe(self) -> str:
        return f"{self.path}[{self.split}]" if self.kind == "hf" else self.path


@dataclass
class Unit:
    """A run of records from one source, the smallest piece of work a worker gets."""

    source: int
    """Index of the source in the input list."""
    start: int
    """Where the unit starts: a byte offset (line-based files) or a row number."""
    kind: str
    """How to read the records: "line" (bytes), "json" (bytes), "file" (bytes), "text" (str or None)."""
    records: list | None
    """The raw records, or None for a byte range ``[start, next_start)`` of ``path`` that the worker reads."""
    next_start: int
    """Where the next unit of the same source starts."""
    path: str = ""
    """The file of a byte-range unit."""


def _kind_of(path: Path, doc_per_file: bool) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    for suffix in (".jsonl", ".parquet", ".txt"):
        if name.endswith(suffix):
            kind = suffix[1:]
            return "txt-file" if kind == "txt" and doc_per_file else kind
    raise UserError(f"unsupported input file {path} (expected one of {', '.join(SUFFIXES)})")


def resolve_sources(inputs: list[str], *, hf: str = "", hf_split: str = "train",
                    doc_per_file: bool = False) -> list[Source]:
    """Expand the command line's inputs into a sorted, checked list of sources.

    A directory contributes every file below it with a supported suffix (sorted by path), so the
    order, and therefore the output, does not depend on the file system's listing order.
    """
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise UserError(f"input not found: {item}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
            if not files:
                raise UserError(f"input directory {item} holds no {', '.join(SUFFIXES)} files")
        else:
            files = [path]
        for f in files:
            if not os.access(f, os.R_OK):
                raise UserError(f"input not readable: {f}")
            sources.append(Source(_kind_of(f, doc_per_file), str(f)))
    if hf:
        sources.append(Source("hf", hf, hf_split))
    if not sources:
        raise UserError("no input: give --input FILE_OR_DIR (repeatable) or --hf NAME_OR_PATH")
    return sources


def fingerprint_sources(sources: list[Source]) -> list:
    """What identifies the input for resuming: paths with size and modification time (datasets: length
    and content fingerprint)."""
    out = []
    for s in sources:
        if s.kind == "hf":
            ds = load_hf(s.path, s.split)  # its content fingerprint changes whenever the data does
            out.append([s.kind, s.path, s.split, len(ds), getattr(ds, "_fingerprint", "")])
        else:
            st = os.stat(s.path)
            out.append([s.kind, s.path, st.st_size, st.st_mtime_ns])
    return out


def check_sources(sources: list[Source], field: str) -> None:
    """Fail early (before anything is written) on a parquet file or dataset that lacks the text column."""
    for source in sources:
        if source.kind == "parquet":
            next(_parquet_units(0, source, field, 1 << 62), None)
        elif source.kind == "hf":
            next(_hf_units(0, source, field, 1 << 62), None)


_SCAN_BYTES = 1 << 16


def _line_end(f, pos: int, size: int) -> int:
    """Offset just past the first newline at or after ``pos`` (the file's size when there is none)."""
    while pos < size:
        f.seek(pos)
        block = f.read(_SCAN_BYTES)
        if not block:
            break
        found = block.find(b"\n")
        if found >= 0:
            return pos + found + 1
        pos += len(block)
    return size


def _range_units(index: int, source: Source, start: int, unit_bytes: int) -> Iterator[Unit]:
    """Byte-range units of a plain .txt/.jsonl file, each ending at a line end.

    A unit holds the lines up to and including the first one that ends more than ``unit_bytes``
    past its start (where ``f.readlines(unit_bytes)`` would stop), so boundaries depend only on
    the file's bytes. Only the few bytes around each cut point are read here.
    """
    kind = "line" if source.kind == "txt" else "json"
    try:
        with open(source.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while start < size:
                end = _line_end(f, start + unit_bytes, size)
                yield Unit(index, start, kind, None, end, source.path)
                start = end
    except OSError as e:
        raise UserError(f"cannot read {source.path}: {e.strerror or e}") from None


def read_range(path: str, start: int, end: int) -> list[bytes]:
    """The lines of bytes ``[start, end)`` of a file, split at ``\n`` (which is dropped) and nowhere else."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) != end - start:
        raise UserError(f"{path} shrank while it was being read (expected bytes {start}-{end})")
    lines = data.split(b"\n")
    if not lines[-1]:  # the range ends with a newline (or is empty): no record after it
        lines.pop()
    return lines


def unit_records(unit: Unit) -> list:
    """A unit's raw records: those it carries, or the lines of its byte range read from the file."""
    return unit.records if unit.records is not None else read_range(unit.path, unit.start, unit.next_start)


def _line_units(index: int, source: Source, start: int, line: int, unit_bytes: int) -> Iterator[Unit]:
    """Units of a .jsonl.gz file, which cannot seek cheaply: the records travel in the unit."""
    try:
        with gzip.open(source.path, "rb") as f:
            if start:
                f.seek(start)
            while True:
                try:
                    records = f.readlines(unit_bytes)
                except (OSError, EOFError) as e:  # a corrupt or truncated .gz
                    where = f" past line {line - 1}" if line > 1 else ""
                    raise UserError(f"cannot read {source.path}{where}: {e}") from None
                if not records:
                    return
                end = f.tell()
                yield Unit(index, start, "json", records, end)
                start, line = end, line + len(records)
    except OSError as e:
        raise UserError(f"cannot read {source.path}: {e.strerror or e}") from None


def _file_unit(index: int, source: Source) -> Iterator[Unit]:
    try:
        data = Path(source.path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {source.path}: {e.strerror or e}") from None
    yield Unit(index, 0, "file", [data], 1)


def _parquet_units(index: int, source: Source, field: str, start: int) -> Iterator[Unit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise UserError(f"cannot read {source.path} as parquet: {e}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{source.path} has no column '{field}' (has: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=UNIT_ROWS, columns=[field]):
        n = batch.num_rows
        if row + n > start:
            records = batch.column(0).to_pylist()[max(0, start - row):]
            first = max(row, start)
            yield Unit(index, first, "text", records, row + n)
        row += n


def load_hf(name: str, split: str):
    """A ``datasets`` split from a ``save_to_disk`` directory, a local dataset directory, or the cache."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UserError("--hf needs the 'datasets' package") from None
    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"dataset {name} has no split '{split}' (has: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(name, split=split)
    except UserError:
        raise
    except Exception as e:  # offline hub lookups, missing splits, bad files: all one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset {name} split '{split}': {first}") from None


def _hf_units(index: int, source: Source, field: str, start: int) -> Iterator[Unit]:
    ds = load_hf(source.path, source.split)
    if field not in ds.column_names:
        raise UserError(f"dataset {source.describe()} has no column '{field}' (has: {', '.join(ds.column_names)})")
    column = ds.select_columns([field])
    for row in range(start, len(ds), UNIT_ROWS):
        records = column[row:row + UNIT_ROWS][field]
        yield Unit(index, row, "text", records, row + len(records))


def iter_units(sources: list[Source], *, field: str = "text", position: tuple[int, int, int] = (0, 0, 1),
               unit_bytes: int = UNIT_BYTES) -> Iterator[Unit]:
    """All units of all sources in order, starting at ``position`` = (source, start, line).

    ``unit_bytes`` sets the size of units of line-based files; it changes how work is cut, never the output.
    """
    first_source, start, line = position
    for index in range(first_source, len(sources)):
        source = sources[index]
        if index > first_source:
            start, line = 0, 1
        if source.kind in ("txt", "jsonl"):
            yield from _range_units(index, source, start, unit_bytes)
        elif source.kind == "jsonl.gz":
            yield from _line_units(index, source, start, line, unit_bytes)
        elif source.kind == "txt-file":
            if start == 0:
                yield from _file_unit(index, source)
        elif source.kind == "parquet":
            yield from _parquet_units(index, source, field, start)
        elif source.kind == "hf":
            yield from _hf_units(index, source, field, start)
        else:  # pragma: no cover - resolve_sources only makes the kinds above
            raise AssertionError(source.kind)


def record_to_text(kind: str, record, field: str, max_doc_chars: int) -> tuple[str | None, str]:
    """Decode one raw record: (text, "") when usable, else (None, skip reason)."""
    if kind == "text":
        text = record
        if text is None:
            return None, "missing_field"
        if not isinstance(text, str):
            return None, "not_text"
    else:
        if kind == "line":  # the newline itself, when still there, a CR before it and any trailing CR
            record = record.rstrip(b"\r\n")
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_utf8"
        if kind == "json":
            if not text.strip():
                return None, "empty"
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):  # JSONDecodeError, or nesting too deep to parse
                return None, "invalid_json"
            if not isinstance(obj, dict) or obj.get(field) is None:
                return None, "missing_field"
            text = obj[field]
            if not isinstance(text, str):
                return None, "not_text"
            try:  # JSON escapes can spell lone surrogates, which are not Unicode text
                text.encode("utf-8")
            except UnicodeEncodeError:
                return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    if max_doc_chars and len(text) > max_doc_chars:
        return None, "too_long"
    return text, ""


def iter_texts(sources: list[Source], *, field: str = "text", max_doc_chars: int = 0) -> Iterator[str]:
    """Usable documents of the corpus, in order (bad records silently left out: for sampling only)."""
    for unit in iter_units(sources, field=field):
        for record in unit_records(unit):
            text, _ = record_to_text(unit.kind, record, field, max_doc_chars)
            if text is not None:
                yield text
