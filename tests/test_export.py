import json

import pytest
import torch
from safetensors.torch import load_file

from ds_mtp.cli import main
from ds_mtp.config import load_config
from ds_mtp.data import TokenShards, WindowSampler
from ds_mtp.model import load_exported
from ds_mtp.monitor import read_metrics
from tests.conftest import run_cli

TINY = ["model.preset=tiny", "model.mtp_k=2", "train.seq_len=16", "train.micro_batch=4", "train.lr=3e-3"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_export_equals_the_live_model_and_the_engines_loss(tmp_path, token_data):
    run, exported, latest = tmp_path / "run", tmp_path / "exported", tmp_path / "latest"
    r = run_cli("train", "--nproc", "2", "--run-dir", str(run), f"data.path={token_data}", *TINY,
                "train.max_steps=3", "train.save_every=2")
    assert r.returncode == 0, r.stderr[-3000:]

    # The latest checkpoint, consolidated from the two ranks' ZeRO-3 partitions, is the model the run
    # gathered from its live engine at the end.
    r = run_cli("export", "--run-dir", str(run), "--out", str(latest))
    assert r.returncode == 0, r.stderr[-3000:]
    live, from_checkpoint = load_file(run / "model" / "model.safetensors"), load_file(latest / "model.safetensors")
    assert live.keys() == from_checkpoint.keys()
    for name in live:
        torch.testing.assert_close(from_checkpoint[name], live[name], rtol=0, atol=0, msg=name)
    tokens = WindowSampler(TokenShards(token_data, "train"), 16, 4).batch(0).tokens
    torch.testing.assert_close(load_exported(latest).head_logits(tokens), load_exported(run / "model").head_logits(tokens))

    # The step-2 checkpoint gives, on step 3's batches of both ranks, the loss the engine logged at step 3.
    r = run_cli("export", str(run), "--tag", "step2", "--out", str(exported))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((exported / "config.json").read_text())["source"] == {
        "run_dir": str(run), "tag": "step2", "step": 2, "layout": "zero-3"}
    model = load_exported(exported)
    seed = load_config(None, []).train.seed
    losses = []
    for rank in (0, 1):
        batch = WindowSampler(TokenShards(token_data, "train"), 16, 4, seed=seed, dp_rank=rank, dp_size=2).batch(2)
        with torch.no_grad():
            losses.append(model(batch.tokens, batch.doc_ids)["loss"].item())
    assert sum(losses) / 2 == pytest.approx(read_metrics(run / "metrics.jsonl")[2]["loss"], rel=1e-5)


@pytest.fixture
def fake_run(tmp_path):
    """A run directory with a config and two (empty) checkpoint tags: enough for the argument checks."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step2").mkdir(parents=True)
    (run / "checkpoints" / "step4").mkdir()
    (run / "checkpoints" / "latest").write_text("step4")
    (run / "config.json").write_text(json.dumps(load_config(None, ["model.preset=tiny"]).to_dict()))
    return run


def _fails(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: "), err


def test_unknown_tag_names_the_available_ones(fake_run, tmp_path, capsys):
    _fails(capsys, ["export", str(fake_run), "--tag", "step3", "--out", str(tmp_path / "out")],
           "no checkpoint tag 'step3' in")
    _fails(capsys, ["export", str(fake_run), "--tag", "step3", "--out", str(tmp_path / "out")], "(has: step2, step4)")
    assert not (tmp_path / "out").exists()


def test_not_a_run_directory_and_no_run_directory(tmp_path, capsys):
    _fails(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "out")], "is not a ds-mtp run directory")
    _fails(capsys, ["export", "--out", str(tmp_path / "out")], "no run directory")


def test_existing_export_is_not_overwritten(fake_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"keep me")
    _fails(capsys, ["export", str(fake_run), "--out", str(out)], "already holds an exported model")
    assert (out / "model.safetensors").read_bytes() == b"keep me"


def test_a_tag_that_is_not_a_checkpoint(fake_run, tmp_path, capsys):
    _fails(capsys, ["export", str(fake_run), "--out", str(tmp_path / "out")], "is not a DeepSpeed checkpoint")
