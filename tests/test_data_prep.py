"""data_prep on real English (the standard library's docstrings) and hand-written bad records."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ds_mtp.cli import prep_main
from data_prep.corpus import iter_units, read_range, record_to_text, resolve_sources, unit_records
from data_prep.shard import shard_corpus
from data_prep.stdlib_corpus import write_stdlib_corpus
from data_prep.tokenizer import adopt_tokenizer, load_processor, train_tokenizer
from data_prep.verify import inspect_data, verify_data
from ds_mtp.cli import main as ds_main
from ds_mtp.data import TokenShards, read_meta, sha256_file
from ds_mtp.monitor import read_metrics
from tests.conftest import REPO, run_cli

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    write_stdlib_corpus(path, max_docs=400, **quiet)
    return path


@pytest.fixture(scope="module")
def docs(corpus) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus)], out, vocab_size=600, sample_docs=300, threads=1, **quiet)
    return out


@pytest.fixture(scope="module")
def reference(corpus, tokenizer, tmp_path_factory) -> Path:
    """The corpus sharded with one worker in one go: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "data"
    shard_corpus([str(corpus)], tokenizer, out, shard_tokens=6000, val_fraction=0.1, progress=False,
                 unit_bytes=20_000, **quiet)
    return out


def shard_files(data: Path) -> dict:
    files = {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.suffix in (".bin", ".idx")}
    meta = json.loads((data / "manifest.json").read_text())
    meta["extra"].pop("command")
    return {**files, "meta": meta}


def decoded(data: Path, split: str) -> list[str]:
    sp = load_processor(data / "tokenizer.model")
    shards = TokenShards(data, split)
    eos = read_meta(data).special_ids["eos"]
    out = []
    for i in range(shards.num_documents):
        ids = shards.document(i).tolist()
        assert ids[-1] == eos
        out.append(sp.decode(ids[:-1]))
    return out


def test_round_trip_gives_back_every_document(reference, docs):
    meta = read_meta(reference)
    assert meta.extra["documents"] == len(docs) and sum(meta.extra["skipped"].values()) == 0
    train, val = decoded(reference, "train"), decoded(reference, "val")
    assert sorted(train + val) == sorted(docs)
    assert 0.03 * len(docs) < len(val) < 0.2 * len(docs)
    assert len(meta.shards("train")) > 3  # rolled over many times
    assert [d for d in docs if d in set(train)] == train  # order kept within a split
    assert verify_data(reference, **quiet) == []


def test_output_is_identical_whatever_the_worker_count(corpus, tokenizer, reference, tmp_path):
    out = tmp_path / "w2"
    shard_corpus([str(corpus)], tokenizer, out, shard_tokens=6000, val_fraction=0.1, progress=False,
                 workers=2, unit_bytes=7_000, **quiet)
    assert shard_files(out) == shard_files(reference)


def _prep(*args):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, timeout=120,
                          env=full_env, cwd=REPO)


# `python -c` program: `data_prep ARGS` SIGKILLed (no cleanup runs) right after it has absorbed unit N, before
# that unit's checkpoint is due; the kill is patched into ShardRun.absorb, production code has no hook.
KILLED_AFTER_UNIT_N = """
import os, signal, sys
from data_prep import shard
from ds_mtp.cli import prep_main as main
absorb, absorbed = shard.ShardRun.absorb, []
def absorb_then_die_at_n(run, result):
    shard_done = absorb(run, result)
    absorbed.append(result)
    if len(absorbed) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return shard_done
shard.ShardRun.absorb = absorb_then_die_at_n
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_after", [2, 9])
def test_sigkill_then_rerun_is_byte_identical(corpus, tokenizer, reference, tmp_path, kill_after):
    out = tmp_path / "data"
    args = ["shard", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out), "--shard-tokens", "6000",
            "--val-fraction", "0.1", "--unit-bytes", "20000", "--no-progress"]
    r = subprocess.run([sys.executable, "-c", KILLED_AFTER_UNIT_N, str(kill_after), *args], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                       cwd=REPO)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    dtype_size = 2
    for bin_path in out.glob("*.bin"):  # whatever is under a final name is a complete shard
        offsets = np.fromfile(bin_path.with_suffix(".idx"), dtype="<i8")
        assert offsets[-1] * dtype_size == bin_path.stat().st_size
    r = _prep(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from the checkpoint" in r.stdout
    assert shard_files(out) == shard_files(reference)
    assert not any(p.name.endswith(".tmp") or p.name == ".prep_state" for p in out.iterdir())
    r = _prep(*args)  # a finished run stays as it is
    assert r.returncode == 0 and "already complete" in r.stdout


BAD_JSONL = b"\n".join([
    b'{"text": "A good first document about parsing."}',
    b'{"text": "broken json',
    b'{"text": ' + b"[" * 100_000,
    b'{"title": "no text field"}',
    b'{"text": 42}',
    b'{"text": "latin-1 bytes \xe9t\xe9"}',
    b'{"text": "a lone surrogate \\ud800 escape"}',
    b'{"text": "   "}',
    b'{"text": "' + b"x" * 300 + b'"}',
    b'',
    b'{"text": "A good second document, the last one."}',
]) + b"\n"


def test_every_bad_record_is_counted_with_its_location(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_JSONL)
    txt = tmp_path / "lines.txt"
    txt.write_bytes(b"One good line of text.\n\xff\xfe not utf-8\n\nAnother good line.\n")
    logged = []
    meta = shard_corpus([str(bad), str(txt)], tokenizer, tmp_path / "out", max_doc_chars=200, val_fraction=0,
                        progress=False, log=logged.append)
    assert meta.extra["documents"] == 4 and meta.extra["records"] == 15
    assert meta.extra["skipped"] == {"invalid_json": 2, "missing_field": 1, "not_text": 1, "not_utf8": 3,
                                     "empty": 3, "too_long": 1, "duplicate": 0}
    assert meta.extra["skip_examples"][:3] == [f"{bad}:2: invalid_json", f"{bad}:3: invalid_json", f"{bad}:4: missing_field"]
    assert any("skipped 11" in line for line in logged)
    assert decoded(tmp_path / "out", "train") == ["A good first document about parsing.",
                                                  "A good second document, the last one.",
                                                  "One good line of text.", "Another good line."]
    r = _prep("shard", "--input", str(bad), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "strict"),
              "--strict", "--no-progress")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: bad record at {bad}:2: invalid json (--strict)"]


AWKWARD_LINES = b"first\r\nsecond has a lone \r inside\n\n\nthird\r\r\n  \n\xff not utf-8\nlast, without a newline"


def _readlines_reference(path: Path, unit_bytes: int) -> tuple[list[bytes], list[int]]:
    """Lines (newline dropped) and unit starts as ``open(path, "rb").readlines(unit_bytes)`` cuts them."""
    lines, starts = [], []
    with open(path, "rb") as f:
        while chunk := f.readlines(unit_bytes):
            starts.append(f.tell() - sum(map(len, chunk)))
            lines += [line[:-1] if line.endswith(b"\n") else line for line in chunk]
    return lines, starts


@pytest.mark.parametrize("unit_bytes", [1, 7, 1 << 20])
@pytest.mark.parametrize("final_newline", [False, True])
def test_byte_range_units_give_exactly_the_files_lines(tmp_path, unit_bytes, final_newline):
    path = tmp_path / "awkward.txt"
    path.write_bytes(AWKWARD_LINES + (b"\n" if final_newline else b""))
    expected = [b"first\r", b"second has a lone \r inside", b"", b"", b"third\r\r", b"  ", b"\xff not utf-8",
                b"last, without a newline"]
    units = list(iter_units(resolve_sources([str(path)]), unit_bytes=unit_bytes))
    assert all(u.records is None for u in units)  # the parent hands over ranges, not text
    assert [u.start for u in units] == [0] + [u.next_start for u in units[:-1]]
    assert units[-1].next_start == path.stat().st_size
    assert all(path.read_bytes()[u.next_start - 1:u.next_start] == b"\n" for u in units[:-1])
    assert [r for u in units for r in unit_records(u)] == expected
    assert len(units) == 1 if unit_bytes > 100 else len(units) > 3
    # The same cut points (and so the same resume positions) as reading with readlines(unit_bytes) in binary.
    assert _readlines_reference(path, unit_bytes) == (expected, [u.start for u in units])
    texts = [record_to_text(u.kind, r, "text", 0) for u in units for r in unit_records(u)]
    assert texts == [("first", ""), ("second has a lone \r inside", ""), (None, "empty"), (None, "empty"),
                     ("third", ""), (None, "empty"), (None, "not_utf8"), ("last, without a newline", "")]
    # Universal newlines would also split at the lone CR and at the CR of "\r\r\n": two more lines.
    assert len(path.read_text(errors="replace").splitlines()) == len(expected) + 2
    # A .jsonl file is cut the same way; JSON records keep their CRs (JSON whitespace between tokens).
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"text": "one"}\r\n\r\n{"text":\r"two"}\n{"text": "three"}')
    units = list(iter_units(resolve_sources([str(jsonl)]), unit_bytes=unit_bytes))
    assert [record_to_text(u.kind, r, "text", 0) for u in units for r in unit_records(u)] == \
        [("one", ""), (None, "empty"), ("two", ""), ("three", "")]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert list(iter_units(resolve_sources([str(empty)]), unit_bytes=unit_bytes)) == []
    assert read_range(str(path), 0, 0) == []


def _numbered_jsonl(path: Path, n: int, bad: dict) -> None:
    lines = [bad.get(i, json.dumps({"text": f"Document number {i} of the numbered corpus."}).encode())
             for i in range(1, n + 1)]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_a_bad_record_is_reported_at_its_exact_line_with_two_workers(tokenizer, tmp_path):
    a = tmp_path / "a.jsonl"
    _numbered_jsonl(a, 400, {251: b'{"text": "broken'})
    b = tmp_path / "b.txt"  # CRLF lines, a lone CR, a blank line at 3 and bad UTF-8 at 7
    b.write_bytes(b"one\r\ntwo with a lone \r in it\r\n\r\nfour\r\nfive\r\nsix\r\n\xff seven\r\neight")
    c = tmp_path / "c.jsonl.gz"  # records handed over in the unit: line numbers the same way
    with gzip.open(c, "wb") as f:
        f.write(b"\n".join(json.dumps({"text": f"gz doc {i}"}).encode() if i != 12 else b'{"t": 1}'
                           for i in range(1, 31)) + b"\n")
    out = tmp_path / "out"
    r = _prep("shard", "--input", str(a), "--input", str(b), "--input", str(c), "--tokenizer", str(tokenizer),
              "--out", str(out), "--workers", "2", "--unit-bytes", "500", "--shard-tokens", "2000", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["skip_examples"] == [f"{a}:251: invalid_json", f"{b}:3: empty", f"{b}:7: not_utf8",
                                                  f"{c}:12: missing_field"]
    assert manifest["extra"]["records"] == 400 + 8 + 30 and manifest["extra"]["documents"] == 399 + 6 + 29
    # The manifest holds everything the issue lists.
    assert manifest["extra"]["tokenizer_sha256"] == sha256_file(tokenizer / "tokenizer.model")
    assert manifest["vocab_size"] == 600 and manifest["dtype"] == "<u2"
    assert manifest["extra"]["skipped"] == {"invalid_json": 1, "missing_field": 1, "not_text": 0, "not_utf8": 1,
                                            "empty": 1, "too_long": 0, "duplicate": 0}
    command = manifest["extra"]["command"]
    assert command[command.index("shard"):][:2] == ["shard", "--input"] and command[-2:] == ["2000", "--no-progress"]
    shards = [s for split in ("train", "val") for s in manifest["splits"][split]]
    assert len(shards) > 2 and sum(s["documents"] for s in shards) == manifest["extra"]["documents"]
    for s in shards:
        assert sha256_file(out / f"{s['name']}.bin") == s["sha256"]
        assert sha256_file(out / f"{s['name']}.idx") == s["idx_sha256"]
        assert (out / f"{s['name']}.bin").stat().st_size == 2 * s["tokens"]
        assert np.fromfile(out / f"{s['name']}.idx", dtype="<i8").size == s["documents"] + 1
    texts = decoded(out, "train") + decoded(out, "val")
    assert "two with a lone \r in it" in texts and "eight" in texts and "gz doc 30" in texts
    one = shard_corpus([str(a), str(b), str(c)], tokenizer, tmp_path / "w1", shard_tokens=2000, progress=False, **quiet)
    assert one.extra["skip_examples"] == manifest["extra"]["skip_examples"]
    assert shard_files(tmp_path / "w1") == shard_files(out)  # one worker, 1 MiB units: the same bytes
    r = _prep("shard", "--input", str(b), "--input", str(a), "--tokenizer", str(tokenizer), "--out",
              str(tmp_path / "strict"), "--workers", "2", "--unit-bytes", "500", "--strict", "--no-progress")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: bad record at {b}:3: empty (--strict)"]
    _numbered_jsonl(a, 400, {251: b'{"text": 7}'})
    r = _prep("shard", "--input", str(a), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "strict2"),
              "--workers", "2", "--unit-bytes", "500", "--strict", "--no-progress")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: bad record at {a}:251: not text (--strict)"]


def test_a_directory_from_an_older_version_with_meta_json_is_still_complete(corpus, tokenizer, reference, tmp_path,
                                                                          capsys):
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    (old / "manifest.json").rename(old / "meta.json")
    logged = []
    meta = shard_corpus([str(corpus)], tokenizer, old, shard_tokens=6000, val_fraction=0.1, progress=False,
                        unit_bytes=20_000, log=logged.append)
    assert "already complete" in logged[-1] and meta == read_meta(reference)
    assert verify_data(old, **quiet) == [] and decoded(old, "val") == decoded(reference, "val")
    assert prep_main(["shard", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(old),
                      "--val-fraction", "0.2"]) == 2
    assert "already holds shards from other inputs or options" in capsys.readouterr().err
    meta = shard_corpus([str(corpus)], tokenizer, old, shard_tokens=6000, val_fraction=0.2, progress=False,
                        overwrite=True, **quiet)
    assert (old / "manifest.json").is_file() and not (old / "meta.json").exists()


def test_other_formats_give_the_same_shards(docs, tokenizer, reference, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=100)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    expected = shard_files(reference)
    expected["meta"]["extra"].pop("inputs")
    for kind, extra in [("gz", dict(inputs=[str(tmp_path / "c.jsonl.gz")])),
                        ("parquet", dict(inputs=[str(tmp_path / "c.parquet")])),
                        ("hf", dict(inputs=[], hf=str(tmp_path / "hf"), hf_split="train"))]:
        out = tmp_path / kind
        shard_corpus(tokenizer=tokenizer, out=out, field="body", shard_tokens=6000, val_fraction=0.1,
                     progress=False, **extra, **quiet)
        got = shard_files(out)
        got["meta"]["extra"].pop("inputs")
        for key in ("fingerprint", "options"):
            got["meta"]["extra"].pop(key), expected["meta"]["extra"].pop(key, None)
        assert got == expected, kind


def test_doc_per_file_dedup_and_inspect(tokenizer, tmp_path, capsys):
    src = tmp_path / "files"
    src.mkdir()
    for i, text in enumerate(["First file.\nIt has two lines.", "Second file.", "First file.\nIt has two lines."]):
        (src / f"{i}.txt").write_text(text)
    meta = shard_corpus([str(src)], tokenizer, tmp_path / "out", doc_per_file=True, dedup=True, val_fraction=0,
                        progress=False, **quiet)
    assert meta.extra["documents"] == 2 and meta.extra["skipped"]["duplicate"] == 1
    texts = inspect_data(tmp_path / "out", count=5, **quiet)
    assert [t.removesuffix(load_processor(tokenizer).id_to_piece(2)) for t in texts] == \
        ["First file.\nIt has two lines.", "Second file."]
    assert prep_main(["inspect", str(tmp_path / "out"), "-n", "1"]) == 0
    assert "First file." in capsys.readouterr().out


def test_verify_catches_a_flipped_byte_and_a_truncated_index(reference, tmp_path, capsys):
    for damage in ("flip", "truncate"):
        data = tmp_path / damage
        shutil.copytree(reference, data)
        if damage == "flip":
            raw = bytearray((data / "train_00001.bin").read_bytes())
            raw[101] ^= 0x01
            (data / "train_00001.bin").write_bytes(bytes(raw))
        else:
            idx = (data / "val_00000.idx").read_bytes()
            (data / "val_00000.idx").write_bytes(idx[:-8])
        assert prep_main(["verify", str(data)]) == 1
        out = capsys.readouterr().out
        fault = "train_00001.bin: sha256 differs" if damage == "flip" else "val_00000.idx: offsets must"
        assert fault in out and out.strip().splitlines()[-1].startswith("FAILED")
    assert ds_main(["prep", "verify", str(reference)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")


def test_tokenizer_unigram_and_adopt(corpus, tokenizer, tmp_path):
    info = train_tokenizer([str(corpus)], tmp_path / "uni", vocab_size=500, model_type="unigram", sample_docs=200,
                           threads=1, **quiet)
    assert info["vocab_size"] == 500 and info["special_ids"] == {"pad": 3, "bos": 1, "eos": 2, "unk": 0}
    sp = load_processor(tmp_path / "uni")
    assert sp.decode(sp.encode("Return the value of x, 2024.")) == "Return the value of x, 2024."
    assert sp.encode("😀")  # byte fallback: never an unknown piece
    assert sp.unk_id() not in sp.encode("😀 ünïcode")
    adopted = adopt_tokenizer(tokenizer / "tokenizer.model", tmp_path / "adopted", **quiet)
    assert adopted["sha256"] == json.loads((tokenizer / "tokenizer_info.json").read_text())["sha256"]


def _one_line_error(capsys, argv, message, code=2):
    assert prep_main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line_exit_2_and_keeps_existing_output(corpus, tokenizer, reference, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    (tmp_path / "notes.csv").write_text("a,b\n")
    tok = str(tokenizer)
    _one_line_error(capsys, ["shard", "--input", "/nonexistent.jsonl", "--tokenizer", tok, "--out", str(tmp_path / "o")],
                    "input not found: /nonexistent.jsonl")
    _one_line_error(capsys, ["shard", "--input", str(empty), "--tokenizer", tok, "--out", str(tmp_path / "o"),
                             "--no-progress"], "no documents to write: the corpus is empty after skipping 2 empty")
    assert not (tmp_path / "o" / "manifest.json").exists() and not list((tmp_path / "o").glob("*.bin"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"]}), tmp_path / "t.parquet")
    _one_line_error(capsys, ["shard", "--input", str(tmp_path / "t.parquet"), "--tokenizer", tok, "--out",
                             str(tmp_path / "pq")], "t.parquet has no column 'text' (has: body)")
    assert not (tmp_path / "pq").exists()
    _one_line_error(capsys, ["shard", "--input", str(tmp_path / "notes.csv"), "--tokenizer", tok, "--out",
                             str(tmp_path / "o")], "unsupported input file")
    _one_line_error(capsys, ["shard", "--input", str(corpus), "--tokenizer", str(tmp_path), "--out",
                             str(tmp_path / "o")], "tokenizer not found")
    _one_line_error(capsys, ["shard", "--input", str(corpus), "--tokenizer", tok, "--out", str(tmp_path / "o"),
                             "--workers", "0"], "--workers must be at least 1")
    _one_line_error(capsys, ["tokenizer", "--input", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size", "100"],
                    "--vocab-size 100 is too small")
    _one_line_error(capsys, ["tokenizer", "--input", str(corpus), "--out", str(tmp_path / "t"), "--vocab-size",
                             "900000", "--sample-docs", "20", "--threads", "1"], "SentencePiece could not train")
    _one_line_error(capsys, ["tokenizer", "--input", str(corpus), "--out", str(tokenizer)], "already exists")
    _one_line_error(capsys, ["tokenizer", "--input", str(empty), "--out", str(tmp_path / "t")], "no usable documents")
    # Existing output: different options, a different tokenizer, stray shards: refused, bytes unchanged.
    before = shard_files(reference)
    _one_line_error(capsys, ["shard", "--input", str(corpus), "--tokenizer", tok, "--out", str(reference),
                             "--val-fraction", "0.2"], "already holds shards from other inputs or options")
    other = tmp_path / "other_tok"
    train_tokenizer([str(corpus)], other, vocab_size=500, sample_docs=100, threads=1, **quiet)
    _one_line_error(capsys, ["shard", "--input", str(corpus), "--tokenizer", str(other), "--out", str(reference)],
                    "holds shards of a different tokenizer")
    _one_line_error(capsys, ["shard", "--input", str(corpus), "--tokenizer", tok, "--out", str(tmp_path / "fresh"),
                             "--resume"], "holds no interrupted run to resume")
    assert shard_files(reference) == before and verify_data(reference, **quiet) == []
    _one_line_error(capsys, ["verify", str(tmp_path / "nothing")], "data directory not found")


@pytest.mark.slow
def test_ds_mtp_trains_on_text_shards(reference, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--run-dir", str(run), "--data", str(reference), "model.preset=tiny", "model.mtp_k=3",
                "train.seq_len=64", "train.micro_batch=4", "train.max_steps=4", "train.save_model=false")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(row["loss"]) for row in rows)
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 600


def test_packed_windows_mark_every_document_boundary(reference):
    """MTP targets must not cross an EOS: the sampler gives the token after each EOS a new document id."""
    from ds_mtp.data import WindowSampler

    eos = read_meta(reference).special_ids["eos"]
    sampler = WindowSampler(TokenShards(reference, "train"), seq_len=64, micro_batch=64, seed=3)
    batch = sampler.batch(0)
    tokens, doc_ids = batch.tokens.numpy(), batch.doc_ids.numpy()
    after_eos = tokens[:, :-1] == eos
    assert after_eos.sum() > 5
    assert np.all(doc_ids[:, 1:][after_eos] != doc_ids[:, :-1][after_eos])
    assert np.all(doc_ids[:, 1:][~after_eos] == doc_ids[:, :-1][~after_eos])


def test_killed_before_the_first_checkpoint_starts_afresh(corpus, tokenizer, reference, tmp_path):
    out = tmp_path / "data"
    (out / ".prep_state").mkdir(parents=True)
    (out / ".prep_state" / "seen.1.npy").write_bytes(b"partial")
    (out / "train_00000.bin.tmp").write_bytes(b"\1\2\3")
    (out / "val_00000.bin.tmp").write_bytes(b"")
    shard_corpus([str(corpus)], tokenizer, out, shard_tokens=6000, val_fraction=0.1, progress=False,
                 unit_bytes=20_000, **quiet)
    assert shard_files(out) == shard_files(reference)
