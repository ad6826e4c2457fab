import numpy as np
import pytest

from ds_mtp.data import TokenShards, WindowSampler, read_meta, write_documents
from ds_mtp.errors import UserError


@pytest.fixture
def docs():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 90, rng.integers(1, 40)) for _ in range(200)]


def test_round_trip_across_shards(tmp_path, docs):
    meta = write_documents(tmp_path, {"train": docs}, vocab_size=100, special_ids={"pad": 99}, shard_tokens=500)
    shards = TokenShards(tmp_path)
    assert len(shards.tokens) == len(meta.splits["train"]) > 1
    assert shards.num_documents == len(docs) and shards.num_tokens == sum(len(d) for d in docs)
    for i in (0, 57, 199):
        np.testing.assert_array_equal(shards.document(i), docs[i])
    assert read_meta(tmp_path).max_token_id == max(int(d.max()) for d in docs)
    assert shards.tokens[0].dtype == np.uint16


def test_large_vocab_uses_uint32(tmp_path):
    write_documents(tmp_path, {"train": [[70000, 1, 2]]}, vocab_size=70001, special_ids={})
    assert TokenShards(tmp_path).tokens[0].dtype == np.uint32


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_sampler_deterministic_and_rank_disjoint(tmp_path, docs, mode):
    write_documents(tmp_path, {"train": docs}, vocab_size=100, special_ids={"pad": 99}, shard_tokens=500)
    shards = TokenShards(tmp_path)
    a = [WindowSampler(shards, 16, 4, seed=3, dp_rank=r, dp_size=2, mode=mode) for r in range(2)]
    b = WindowSampler(shards, 16, 4, seed=3, dp_rank=0, dp_size=2, mode=mode)
    per_epoch = a[0].num_samples // 8
    seen = []
    for g in range(per_epoch):
        np.testing.assert_array_equal(a[0].batch(g).tokens, b.batch(g).tokens)
        seen += [*a[0].sample_ids(g), *a[1].sample_ids(g)]
    assert len(seen) == len(set(seen))  # no window twice within an epoch, across ranks
    other_seed = WindowSampler(shards, 16, 4, seed=4, mode=mode)
    assert not np.array_equal(other_seed.sample_ids(0), a[0].sample_ids(0))


def test_packed_windows_and_doc_ids(tmp_path, docs):
    write_documents(tmp_path, {"train": docs}, vocab_size=100, special_ids={}, shard_tokens=10**6)
    shards = TokenShards(tmp_path)
    stream = np.concatenate(docs)
    boundaries = np.cumsum([len(d) for d in docs])
    sampler = WindowSampler(shards, 16, 8, seed=0)
    batch = sampler.batch(0)
    for row, wid in zip(batch.tokens.numpy(), sampler.sample_ids(0)):
        np.testing.assert_array_equal(row, stream[wid * 16: wid * 16 + 16])
    for row_doc, wid in zip(batch.doc_ids.numpy(), sampler.sample_ids(0)):
        pos = wid * 16 + np.arange(16)
        np.testing.assert_array_equal(row_doc, np.searchsorted(boundaries, pos, side="right"))


def test_document_mode_pads(tmp_path, docs):
    write_documents(tmp_path, {"train": docs}, vocab_size=100, special_ids={"pad": 99})
    sampler = WindowSampler(TokenShards(tmp_path), 16, 5, seed=0, mode="document")
    batch = sampler.batch(2)
    for row, doc_id in zip(batch.tokens.numpy(), sampler.sample_ids(2)):
        doc = docs[doc_id][:16]
        np.testing.assert_array_equal(row[: len(doc)], doc)
        assert (row[len(doc):] == 99).all()


def test_reader_errors(tmp_path, docs):
    with pytest.raises(UserError, match="not found"):
        TokenShards(tmp_path / "missing")
    with pytest.raises(UserError, match="no manifest.json"):
        TokenShards(tmp_path)
    write_documents(tmp_path, {"train": docs}, vocab_size=100, special_ids={})
    with pytest.raises(UserError, match="no 'valid' tokens"):
        TokenShards(tmp_path, "valid")
    (tmp_path / "train_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="does not match"):
        TokenShards(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        write_documents(tmp_path / "x", {"train": [[5, 100]]}, vocab_size=100, special_ids={})


def test_manifest_is_manifest_json_and_an_older_meta_json_is_still_read(tmp_path, docs):
    from ds_mtp.data import manifest_path

    new, old = tmp_path / "new", tmp_path / "old"
    meta = write_documents(new, {"train": docs}, vocab_size=100, special_ids={"pad": 99}, shard_tokens=500)
    assert (new / "manifest.json").is_file() and not (new / "meta.json").exists()
    # A directory written by an older version: the same files, the manifest under its old name.
    old.mkdir()
    for p in new.iterdir():
        (old / ("meta.json" if p.name == "manifest.json" else p.name)).write_bytes(p.read_bytes())
    assert manifest_path(old) == old / "meta.json" and read_meta(old) == meta
    shards = TokenShards(old)
    assert shards.num_documents == len(docs)
    np.testing.assert_array_equal(shards.document(57), docs[57])
    (old / "train_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="does not match meta.json"):  # messages name the file actually read
        TokenShards(old)
    # Rewriting the directory replaces the old manifest rather than leaving a stale one beside the new.
    write_documents(old, {"train": docs[:5]}, vocab_size=100, special_ids={"pad": 99})
    assert manifest_path(old) == old / "manifest.json" and not (old / "meta.json").exists()
    assert TokenShards(old).num_documents == 5
    # manifest.json wins over a meta.json beside it.
    (new / "meta.json").write_text("not json")
    assert read_meta(new) == meta


def _shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_add_many_writes_what_add_writes_and_restore_continues_exactly(tmp_path):
    from ds_mtp.data import ShardWriter

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 100, rng.integers(1, 40)) for _ in range(200)]
    one = ShardWriter(tmp_path / "one", "train", 100, shard_tokens=300)
    for d in docs:
        one.add(d)
    infos_one = one.close()
    many = ShardWriter(tmp_path / "many", "train", 100, shard_tokens=300)
    for chunk in (docs[:7], docs[7:120], docs[120:]):
        many.add_many(np.concatenate(chunk), [len(d) for d in chunk])
    assert many.close() == infos_one and _shard_bytes(tmp_path / "many") == _shard_bytes(tmp_path / "one")

    # Crash after a checkpoint: more documents written (one shard completed), then the process dies.
    crashed = ShardWriter(tmp_path / "crash", "train", 100, shard_tokens=300)
    for d in docs[:50]:
        crashed.add(d)
    state = crashed.checkpoint()
    for d in docs[50:90]:
        crashed.add(d)
    crashed._bin.flush()  # what the OS may hold after a SIGKILL
    restored = ShardWriter.restore(tmp_path / "crash", state)
    for d in docs[50:]:
        restored.add(d)
    assert restored.close() == infos_one and _shard_bytes(tmp_path / "crash") == _shard_bytes(tmp_path / "one")
