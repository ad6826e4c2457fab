"""Corrupt shards and manifests are refused before any rank starts: one line, exit 2 (ds_mtp.data_checks)."""

import json
import shutil

import numpy as np
import pytest

from ds_mtp.cli import main
from ds_mtp.config import load_config
from ds_mtp.data import TokenShards, WindowSampler, read_meta
from ds_mtp.data_checks import check_data
from ds_mtp.errors import UserError
from tests.conftest import make_token_data


@pytest.fixture
def data(tmp_path, token_data):
    return shutil.copytree(token_data, tmp_path / "data")


def _train_error(tmp_path, capsys, data, *overrides) -> str:
    """ds-mtp train's one line on stderr; fails unless it exits 2 before any training starts."""
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={data}", "model.preset=tiny",
                 "train.max_steps=1", "train.seq_len=32", "train.micro_batch=2", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    return err


def _edit_manifest(data, **changes):
    raw = json.loads((data / "manifest.json").read_text())
    raw.update(changes)
    (data / "manifest.json").write_text(json.dumps(raw))


def test_an_odd_byte_count_is_refused(tmp_path, capsys, data):
    with open(data / "train_00000.bin", "ab") as f:
        f.write(b"\0")
    err = _train_error(tmp_path, capsys, data)
    assert "train_00000.bin does not match manifest.json" in err and "truncated or replaced" in err


def test_a_truncated_index_is_refused(tmp_path, capsys, data):
    idx = data / "train_00000.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    assert "train_00000.idx does not match manifest.json" in _train_error(tmp_path, capsys, data)


@pytest.mark.parametrize("dtype, message", [("<u4", "the manifest's dtype is wrong"),
                                            ("float32", "ds-mtp shards are <u2 or <u4")])
def test_a_manifest_dtype_the_shards_were_not_written_with_is_refused(tmp_path, capsys, data, dtype, message):
    _edit_manifest(data, dtype=dtype)
    assert message in _train_error(tmp_path, capsys, data)


def test_a_token_id_beyond_the_vocabulary_is_refused(tmp_path, capsys, data):
    _edit_manifest(data, max_token_id=64)  # the data's vocab_size is 64
    err = _train_error(tmp_path, capsys, data)
    assert "token id 64" in err and "vocab_size=64" in err


def test_full_verify_hashes_the_shards_the_quick_check_only_sizes_them(tmp_path, capsys, data):
    tokens = np.memmap(data / "train_00000.bin", dtype="<u2", mode="r+")
    tokens[5] = 1000  # same size: the manifest's sizes still hold
    tokens.flush()
    del tokens
    meta = read_meta(data)
    check_data(data, meta, ["train"], 64, "quick")
    err = _train_error(tmp_path, capsys, data, "data.verify=full")
    assert "data.verify=full" in err and "train_00000.bin: sha256 differs from" in err
    # A run that starts anyway (the quick check) stops at the first batch that reads the id, in one line.
    sampler = WindowSampler(TokenShards(data, "train"), 32, 64, mode="packed")
    with pytest.raises(UserError, match="holds token id 1000, not below its vocab_size=64"):
        for micro in range(sampler.num_samples // 64 + 1):
            sampler.batch(micro)


def test_full_verify_accepts_intact_data_and_is_a_config_choice(tmp_path, token_data):
    meta = read_meta(token_data)
    check_data(token_data, meta, ["train"], 64, "full")
    assert load_config(None, ["data.verify=full"]).data.verify == "full"
    with pytest.raises(UserError, match="data.verify must be one of quick, full"):
        load_config(None, ["data.verify=hash"])


def test_full_verify_reads_token_ids_a_manifest_without_hashes_cannot_vouch_for(tmp_path):
    data = make_token_data(tmp_path / "d")
    tokens = np.memmap(data / "train_00000.bin", dtype="<u2", mode="r+")
    tokens[0] = 63
    tokens.flush()
    del tokens
    from ds_mtp.data import sha256_file

    raw = json.loads((data / "manifest.json").read_text())
    raw["splits"]["train"][0]["sha256"] = sha256_file(data / "train_00000.bin")  # a producer that hashed late
    (data / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="holds token id 63, not below the model's vocab_size=62"):
        check_data(data, read_meta(data), ["train"], 62, "full")


def test_a_manifest_without_max_token_id_has_its_ids_read(tmp_path):
    data = make_token_data(tmp_path / "d")
    raw = json.loads((data / "manifest.json").read_text())
    del raw["max_token_id"]  # another producer's manifest: read as -1, which vouches for nothing
    (data / "manifest.json").write_text(json.dumps(raw))
    check_data(data, read_meta(data), ["train"], 64, "quick")
    with pytest.raises(UserError, match="holds token id 61, not below the model's vocab_size=61"):
        check_data(data, read_meta(data), ["train"], 61, "quick")
