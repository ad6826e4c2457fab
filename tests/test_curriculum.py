"""objective.curriculum: a forward curriculum over the MTP heads (Aynaou et al., ACL 2025)."""

import pytest
import torch

from ds_mtp.cli import main
from ds_mtp.config import ModelConfig, ObjectiveConfig
from ds_mtp.model import MTPModel
from ds_mtp.monitor import read_metrics
from ds_mtp.objective import active_heads

from tests.conftest import run_cli


def test_heads_switch_on_one_at_a_time_the_last_at_the_curriculum_step():
    assert [active_heads(300, 4, s) for s in (0, 99, 100, 199, 200, 299, 300, 5000)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [active_heads(4, 3, s) for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert active_heads(0, 4, 0) == 4 and active_heads(100, 1, 0) == 1


@pytest.mark.parametrize("loss_impl", ["materialized", "chunked"])
def test_heads_not_yet_on_weigh_nothing_in_any_term(loss_impl):
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, max_seq_len=32, mtp_k=3),
                     ObjectiveConfig(lambda_latent=0.3, lambda_semantic=0.2, loss_impl=loss_impl))
    tokens = torch.randint(0, 40, (3, 12))
    full = model(tokens)
    model.active_heads = 2
    out = model(tokens)
    expected = out["ce"][0] + out["ce"][1] + 0.3 * out["latent"][0] + 0.2 * out["semantic"][0]
    torch.testing.assert_close(out["loss"], expected.detach() if loss_impl == "chunked" else expected)
    torch.testing.assert_close(torch.stack(out["ce"]), torch.stack(full["ce"]))  # all heads still reported
    assert out["loss"] < full["loss"]
    out["loss"].backward()
    assert model.heads.transitions[1].weight.grad.abs().max() == 0  # head 3 is off
    assert model.heads.transitions[0].weight.grad.abs().max() > 0


@pytest.mark.slow
def test_train_logs_the_heads_switching_on(tmp_path, token_data):
    run = tmp_path / "run"
    r = run_cli("train", "--run-dir", str(run), f"data.path={token_data}", "model.preset=tiny", "model.mtp_k=3",
                "objective.lambda_latent=0", "objective.lambda_semantic=0", "objective.curriculum=4",
                "train.seq_len=16", "train.micro_batch=4", "train.max_steps=6", "train.save_model=false")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["active_heads"] for row in rows] == [1, 1, 2, 2, 3, 3]
    assert rows[0]["loss"] == pytest.approx(rows[0]["ce_1"], rel=1e-6)  # head 1 alone
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["ce_1"] + rows[-1]["ce_2"] + rows[-1]["ce_3"], rel=1e-5)


@pytest.mark.parametrize("overrides, message", [(["objective.curriculum=-1"], "objective.curriculum=-1"),
                                                (["objective.curriculum=100", "model.mtp_k=1"], "needs model.mtp_k > 1")])
def test_bad_curriculum_is_one_line_exit_2(tmp_path, token_data, capsys, overrides, message):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", "model.preset=tiny",
                 "model.mtp_k=3", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
