"""Held-out evaluation while training (train.eval_every, ds_mtp.validation)."""

import numpy as np
import pytest
import torch

from ds_mtp.cli import main
from ds_mtp.data import Meta, TokenShards, WindowSampler, read_meta, write_documents
from ds_mtp.errors import UserError
from ds_mtp.model import load_exported
from ds_mtp.monitor import PERF_KEYS, Monitor, read_metrics
from ds_mtp.validation import EVAL_SEED, resolve_eval_split
from tests.conftest import run_cli


def _docs(rng, n):
    """Runs of consecutive ids (mod 60) closed by EOS=61, as tests/conftest.py's token data."""
    return [np.concatenate([np.arange(s, s + rng.integers(5, 30)) % 60, [61]]) for s in rng.integers(0, 60, n)]


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    """Train and val splits, as ds-mtp prep shard --val-fraction writes them."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tokens"
    write_documents(path, {"train": _docs(rng, 300), "val": _docs(rng, 60)}, vocab_size=64,
                    special_ids={"pad": 62, "eos": 61})
    return path


def direct_eval(model_dir, data, seq_len: int, windows: int, mode: str = "packed") -> dict:
    """What the run's eval_ce_k / eval_acc_k should be: the exported model in plain PyTorch on the validation
    windows every rank together evaluated (the first ``windows`` of the EVAL_SEED order), as one batch."""
    model = load_exported(model_dir)
    batch = WindowSampler(TokenShards(data, "val"), seq_len, windows, seed=EVAL_SEED, mode=mode).batch(0)
    with torch.no_grad():
        out = model(batch.tokens, batch.doc_ids)
    K = model.cfg.mtp_k
    return {**{f"eval_ce_{k}": out["ce"][k - 1].item() for k in range(1, K + 1)},
            **{f"eval_acc_{k}": out["acc"][k - 1].item() for k in range(1, K + 1)}}


def assert_matches(row, expected, rel=1e-5):
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=rel, abs=rel), key


def test_eval_split_auto_prefers_val_then_heldout_and_names_the_splits_otherwise(val_data):
    from ds_mtp.config import load_config

    def split_for(splits, requested=""):
        meta = Meta(vocab_size=8, dtype="<u2", special_ids={},
                    splits={name: [{"tokens": tokens}] for name, tokens in splits.items()})
        cfg = load_config(None, ["data.path=D", "train.eval_every=5", f"data.eval_split={requested}"])
        return resolve_eval_split(cfg, meta)

    assert split_for({"train": 9, "val": 3}) == "val"
    assert split_for({"train": 9, "heldout": 3}) == "heldout"  # a world (ds-mtp world make)
    assert split_for({"train": 9, "val": 0, "heldout": 3}) == "heldout"  # prep shard --val-fraction 0: empty val
    assert split_for({"train": 9, "val": 3}, "train") == "train"
    with pytest.raises(UserError, match=r"^train.eval_every=5 needs a validation split, but D has only train: set "
                                        r"data.eval_split=SPLIT"):
        split_for({"train": 9, "val": 0})
    with pytest.raises(UserError, match=r"^data.eval_split=test: D has no 'test' tokens \(splits with tokens: "
                                        r"train, val\)$"):
        split_for({"train": 9, "val": 3}, "test")


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=2", "data.eval_split=test"], "data.eval_split=test: {data} has no 'test' tokens (splits with "
                                                     "tokens: train, val)"),
    (["train.eval_every=-1"], "train.eval_every must be 0 (never) or a number of steps (got -1)"),
    (["train.eval_every=2", "train.eval_batches=0"], "train.eval_batches must be at least 1 (got 0)"),
    (["train.eval_every=2", "train.seq_len=2048", "model.max_seq_len=2048"],
     "split 'val' has fewer tokens than one window of 2048"),
])
def test_bad_eval_settings_are_one_line_exit_2(tmp_path, val_data, capsys, overrides, message):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={val_data}", "model.preset=tiny",
                 "train.seq_len=32", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message.format(data=val_data)}\n"
    assert not (tmp_path / "run").exists()


def test_eval_every_on_data_without_a_validation_split_is_one_line_exit_2(tmp_path, token_data):
    r = run_cli("train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", "model.preset=tiny",
                "train.eval_every=10")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: train.eval_every=10 needs a validation split, but {token_data} has only train: set "
        "data.eval_split=SPLIT, or write a 'val' split with ds-mtp prep shard --val-fraction"]


def test_monitor_writes_eval_scalars_under_their_own_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path)
    monitor.log({"step": 2, "loss": 2.0, "ce_1": 1.5, "acc_1": 0.25, "eval_ce_1": 1.75, "eval_acc_1": 0.5,
                 "eval_ce_2": None})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/loss", "loss/ce_1", "accuracy/acc_1", "eval/ce_1", "eval/acc_1"}
    assert events.Scalars("eval/ce_1")[0].value == 1.75 and events.Scalars("eval/ce_1")[0].step == 2
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval_ce_1"] == 1.75


def _training_values(rows):
    return [{k: v for k, v in row.items() if k not in PERF_KEYS and not k.startswith("eval_")} for row in rows]


@pytest.mark.slow
def test_evaluation_leaves_training_exactly_as_without_it_and_matches_the_exported_model(tmp_path, val_data):
    """fp32 CPU, dropout on (so any RNG draw would show), two micro-batches per step: the run evaluating at
    steps 2, 4 and 5 logs bit-identical training metrics to the run without evaluation; its last evaluation is
    the exported model's loss on the same 12 validation windows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    args = [f"data.path={val_data}", "model.preset=tiny", "model.mtp_k=3", "model.dropout=0.1", "train.seq_len=32",
            "train.micro_batch=4", "train.grad_accum=2", "train.max_steps=5", "train.lr=3e-3"]
    r = run_cli("train", "--run-dir", str(plain), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--run-dir", str(evaluated), *args, "train.eval_every=2", "train.eval_batches=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluating split 'val' every 2 steps and at step 5: 3 micro-batch(es) per replica, 12 windows" in r.stdout
    assert "[ds-mtp] eval step 5/5 on 'val' (" in r.stdout

    without, with_eval = read_metrics(plain / "metrics.jsonl"), read_metrics(evaluated / "metrics.jsonl")
    assert _training_values(with_eval) == _training_values(without)
    assert [row["step"] for row in with_eval if "eval_ce_1" in row] == [2, 4, 5]
    assert not any(key.startswith("eval_") for row in without for key in row)
    assert set(with_eval[1]) - set(with_eval[0]) == {f"eval_{m}_{k}" for m in ("ce", "acc") for k in (1, 2, 3)}
    assert with_eval[4]["eval_ce_1"] < with_eval[1]["eval_ce_1"]  # it learns
    assert_matches(with_eval[4], direct_eval(evaluated / "model", val_data, 32, 12))

    events = EventAccumulator(str(evaluated / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/ce_2")] == [2, 4, 5]
    assert {"eval/acc_1", "eval/ce_3", "loss/ce_1"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_evaluation_of_packed_documents_with_document_attention(tmp_path, val_data):
    """data.sampling=packed_documents (padding at windows' tails) and the model's document-masked attention:
    the validation windows are packed as the training ones, and the run's evaluation is the exported model's."""
    run = tmp_path / "run"
    r = run_cli("train", "--run-dir", str(run), f"data.path={val_data}", "model.preset=tiny", "model.mtp_k=2",
                "model.attention=document", "data.sampling=packed_documents", "train.seq_len=48",
                "train.micro_batch=4", "train.max_steps=3", "train.lr=3e-3", "train.eval_every=2",
                "train.eval_batches=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows if "eval_ce_1" in row] == [2, 3]
    assert_matches(rows[-1], direct_eval(run / "model", val_data, 48, 8, mode="packed_documents"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_and_pipeline_evaluations_agree_with_each_other_and_the_exported_models(tmp_path, val_data):
    """Two ZeRO-3 ranks with micro-batch 2 and a 2-stage pipeline with two micro-batches of 2 train on the same 4
    windows per step; evaluating 3 micro-batches per replica resp. 6 on the one pipeline covers the same 12
    validation windows. Each run's last evaluation is its exported model's, and the two agree."""
    zero, pipe = tmp_path / "zero3", tmp_path / "pipe"
    args = [f"data.path={val_data}", "model.preset=tiny", "model.mtp_k=3", "train.seq_len=16", "train.micro_batch=2",
            "train.max_steps=4", "train.lr=3e-3", "train.warmup_steps=1", "objective.lambda_latent=0",
            "train.eval_every=2"]
    r = run_cli("train", "--nproc", "2", "--run-dir", str(zero), *args, "train.eval_batches=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZeRO-3, 2 rank(s)" in r.stdout and "3 micro-batch(es) per replica, 12 windows" in r.stdout
    r = run_cli("train", "--nproc", "2", "--pipeline-stages", "2", "--run-dir", str(pipe), *args,
                "train.grad_accum=2", "train.eval_batches=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline of 2 stages x 1 data-parallel" in r.stdout and "6 micro-batch(es) per replica, 12 windows" \
        in r.stdout

    zero_rows, pipe_rows = read_metrics(zero / "metrics.jsonl"), read_metrics(pipe / "metrics.jsonl")
    for rows in (zero_rows, pipe_rows):
        assert [row["step"] for row in rows if "eval_ce_1" in row] == [2, 4]
    assert_matches(zero_rows[-1], direct_eval(zero / "model", val_data, 16, 12))
    assert_matches(pipe_rows[-1], direct_eval(pipe / "model", val_data, 16, 12))
    for step in (1, 3):
        for key in ("eval_ce_1", "eval_ce_2", "eval_ce_3", "eval_acc_1"):
            assert pipe_rows[step][key] == pytest.approx(zero_rows[step][key], rel=1e-4, abs=1e-4), (step, key)
    for a, b in zip(zero_rows, pipe_rows):  # and the training itself is the same
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluation_asks_a_teacher_rank_for_nothing(tmp_path, val_data, teacher_dir):
    """One ZeRO trainer fed by one teacher rank: the teacher serves exactly the training micro-batches (3 steps x 2),
    and the evaluation (which needs no latent targets) is the exported model's."""
    run = tmp_path / "run"
    r = run_cli("train", "--nproc", "2", "--run-dir", str(run), f"data.path={val_data}", "model.preset=tiny",
                "model.d_model=32", "model.n_layer=1", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4",
                "train.grad_accum=2", "train.max_steps=3", "train.eval_every=1", "train.eval_batches=2",
                f"teacher.source=checkpoint:{teacher_dir}", "teacher.ranks=1", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "served 6 micro-batches" in r.stdout + r.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert all("eval_ce_3" in row and row["teacher_wait_s"] >= 0 for row in rows)
    assert_matches(rows[-1], direct_eval(run / "model", val_data, 32, 8))


def test_a_worlds_heldout_split_is_evaluated_by_default(tmp_path):
    from ds_mtp.config import load_config
    from ds_mtp.run_data import resolve_data
    from ds_mtp.experiments.worlds import make_world

    make_world("usg", "paper", tmp_path / "usg", seed=0)
    cfg = resolve_data(load_config(None, [f"data.path={tmp_path / 'usg'}", "model.preset=paper-graph",
                                          "data.sampling=document", "train.seq_len=24", "train.eval_every=10"]))
    assert cfg.data.eval_split == "heldout" and "heldout" in read_meta(tmp_path / "usg").splits
