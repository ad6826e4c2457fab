"""objective.curriculum: heads 2..K switched on one at a time over the first N optimizer steps."""

import math

import pytest
import torch

from ds_mtp.cli import main
from ds_mtp.config import ModelConfig, ObjectiveConfig
from ds_mtp.data import TokenShards, WindowSampler, read_meta
from ds_mtp.model import MTPModel
from ds_mtp.monitor import read_metrics
from ds_mtp.objective import active_heads, lse_mtp_loss
from tests.conftest import run_cli
from tests.test_objective import random_inputs

COMMON = ["model.preset=tiny", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
          "objective.lambda_latent=0", "objective.lambda_semantic=0"]


def test_schedule_switches_heads_on_evenly_over_n_steps():
    assert [active_heads(300, 4, s) for s in (0, 99, 100, 199, 200, 299, 300, 10_000)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [active_heads(4, 3, s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    assert [active_heads(0, 4, s) for s in (0, 1, 500)] == [4, 4, 4]  # the paper: every head from the start
    assert active_heads(10, 1, 0) == 1
    for N in (1, 2, 5, 7, 10, 299, 300):
        for K in (2, 3, 4, 5, 8):
            n = [active_heads(N, K, s) for s in range(N + 2)]
            assert n[0] == 1 and n[N] == K and n == sorted(n)
            if N >= K - 1:  # one head at a time
                assert all(b - a in (0, 1) for a, b in zip(n, n[1:]))
            for k in range(2, K + 1):  # head k joins at step ceil((k-1) N / (K-1))
                assert min(s for s in range(N + 1) if active_heads(N, K, s) >= k) == math.ceil((k - 1) * N / (K - 1))


@pytest.mark.parametrize("loss_impl", ["materialized", "chunked"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_inactive_heads_weigh_nothing_but_are_still_reported(loss_impl, n):
    hidden, head_hidden, tokens, unembed, embed, doc_ids = random_inputs(K=4)
    weights, lam_l, lam_s = [1.0, 0.5, 0.25, 2.0], 0.3, 0.7
    kw = dict(lambda_latent=lam_l, lambda_semantic=lam_s, pad_id=10, doc_ids=doc_ids, head_weights=weights,
              loss_impl=loss_impl)
    full = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, **kw)
    got = lse_mtp_loss(hidden, head_hidden, tokens, unembed, embed, active_heads=n, **kw)
    for key in ("ce", "latent", "semantic", "acc"):  # every head's terms, on or off
        torch.testing.assert_close(torch.stack(got[key]), torch.stack(full[key]))
    want = (sum(weights[k - 1] * full["ce"][k - 1] for k in range(1, n + 1))
            + lam_l * sum((full["latent"][k - 2] for k in range(2, n + 1)), torch.zeros((), dtype=torch.float64))
            + lam_s * sum((full["semantic"][k - 2] for k in range(2, n + 1)), torch.zeros((), dtype=torch.float64)))
    torch.testing.assert_close(got["loss"], want, atol=1e-10, rtol=1e-10)
    if n == 4:
        torch.testing.assert_close(got["loss"], full["loss"], atol=0, rtol=0)


@pytest.mark.parametrize("loss_impl", ["materialized", "chunked"])
def test_inactive_heads_transitions_get_no_gradient(loss_impl):
    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=32, mtp_k=4),
                     ObjectiveConfig(loss_impl=loss_impl))
    tokens = torch.randint(0, 64, (2, 16))
    model.active_heads = 2
    model(tokens)["loss"].backward()
    w2, w3, w4 = (t.weight.grad for t in model.heads.transitions)
    assert w2 is not None and w2.abs().sum() > 0
    for grad in (w3, w4):
        assert grad is None or torch.count_nonzero(grad) == 0


def test_pipeline_loss_follows_its_active_heads(token_data):
    from ds_mtp.pipeline import LayerSource, PipelineLoss, layer_specs
    from tests.test_pipeline import _config, _run_layers

    cfg = _config(token_data, ["model.mtp_k=3"])
    pad_id = read_meta(token_data).special_ids["pad"]
    torch.manual_seed(0)
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    batch = WindowSampler(TokenShards(token_data, "train"), 16, 4).batch(0)
    model.active_heads = 2
    reference = model(batch.tokens, batch.doc_ids)
    loss_fn = PipelineLoss(cfg, pad_id)
    loss_fn.active_heads = 2
    outputs, _ = _run_layers(layer_specs(LayerSource(model), cfg.model.n_layer), (batch.tokens, batch.doc_ids))
    loss = loss_fn(outputs, (batch.tokens, batch.doc_ids))
    torch.testing.assert_close(loss, reference["loss"])
    full = lse_mtp_loss(*[outputs[i] for i in (0, 1)], batch.tokens, outputs[2], outputs[3], pad_id=pad_id,
                        doc_ids=batch.doc_ids, loss_impl=cfg.objective.loss_impl)
    assert loss.item() == pytest.approx(full["loss"].item() - full["ce"][2].item() - 0.1 * full["latent"][1].item()
                                        - 0.1 * full["semantic"][1].item(), rel=1e-5)


def _check_curriculum_rows(rows, steps):
    assert [r["active_heads"] for r in rows] == [active_heads(4, 3, s) for s in range(steps)]
    assert [r["active_heads"] for r in rows][:6] == [1, 1, 2, 2, 3, 3][:steps]
    for r in rows:  # λ = 0: the loss is the CE of the heads switched on; every head's CE is logged
        assert r["loss"] == pytest.approx(sum(r[f"ce_{k}"] for k in range(1, r["active_heads"] + 1)), rel=1e-5)
        assert all(r[f"ce_{k}"] > 0 for k in (1, 2, 3))
    assert rows[0]["loss"] == pytest.approx(rows[0]["ce_1"], rel=1e-5)


@pytest.mark.slow
def test_training_run_switches_heads_on_and_resumes_exactly(tmp_path, token_data):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [f"data.path={token_data}", *COMMON, "train.max_steps=6", "objective.curriculum=4", "train.save_model=false"]
    r = run_cli("train", "--run-dir", str(full), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    _check_curriculum_rows(rows, 6)
    # The schedule depends on the step alone: a run stopped after step 3 and resumed logs the same rows.
    r = run_cli("train", "--run-dir", str(resumed), *args, "train.stop_after=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--run-dir", str(resumed), "--resume", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = ("step", "active_heads", "loss", "ce_1", "ce_2", "ce_3")
    assert [tuple(x[k] for k in keys) for x in read_metrics(resumed / "metrics.jsonl")] == \
        [tuple(x[k] for k in keys) for x in rows]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stage_pipeline_switches_heads_on(tmp_path, token_data):
    run = tmp_path / "p2"
    r = run_cli("train", "--nproc", "2", "--run-dir", str(run), f"data.path={token_data}", *COMMON,
                "train.seq_len=16", "train.max_steps=4", "train.pipeline_stages=2", "objective.curriculum=4",
                "train.save_model=false")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_curriculum_rows(read_metrics(run / "metrics.jsonl"), 4)


@pytest.mark.parametrize("overrides, message", [
    (["objective.curriculum=-1"], "objective.curriculum=-1: a number of steps (0 = off)"),
    (["objective.curriculum=10", "model.mtp_k=1"], "objective.curriculum=10: a number of steps (0 = off) over which heads 2..K switch on, so it needs model.mtp_k > 1 (got 1)"),
])
def test_bad_curriculum_is_one_line_exit_2(tmp_path, token_data, capsys, overrides, message):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", *COMMON, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()
