"""Resuming on another number of data-parallel ranks (ds_mtp.universal): converted, the global batch kept, and the
losses those of an uninterrupted run."""

import json

import pytest
import torch

from ds_mtp.config import load_config
from ds_mtp.errors import UserError
from ds_mtp.universal import ds_config_entries, prepare_resize, rank_resume_plan, resume_plan
from tests.conftest import run_cli


def _fake_checkpoint(ckpt_dir, dp_world_size, train_batch_size, tag="step2"):
    (ckpt_dir / tag).mkdir(parents=True)
    states = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    torch.save({"dp_world_size": dp_world_size, "ds_config": {"train_batch_size": train_batch_size}}, states)
    # complete, as ds_mtp.checkpoint.save marks a tag before `latest` names it
    (ckpt_dir / tag / "COMPLETE.json").write_text(json.dumps({"files": {states.name: states.stat().st_size}}))
    (ckpt_dir / "latest").write_text(tag)
    return ckpt_dir


def _cfg(*overrides):
    return load_config(None, ["train.micro_batch=2", *overrides])


def test_the_plan_keeps_the_global_batch(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoints", dp_world_size=2, train_batch_size=8)  # micro 2 x accum 2 x 2 ranks
    assert resume_plan(_cfg(), ckpt, "step2", 2) is None
    plan = resume_plan(_cfg("train.grad_accum=2"), ckpt, "step2", 1)
    assert (plan.tag, plan.saved_ranks, plan.global_batch, plan.grad_accum, plan.universal) == \
        ("step2_universal", 2, 8, 4, True)
    assert ds_config_entries(plan) == {"checkpoint": {"load_universal": True}} and ds_config_entries(None) == {}
    assert resume_plan(_cfg(), ckpt, "step2", 4).grad_accum == 1
    zero0 = resume_plan(_cfg("train.zero_stage=0"), ckpt, "step2", 1)  # the whole optimizer state on each rank
    assert zero0.tag == "step2" and not zero0.universal and ds_config_entries(zero0) == {}


@pytest.mark.parametrize("overrides, ranks, message", [
    ([], 3, "global batch of 8 windows .* not a multiple of train.micro_batch=2 x 3 ranks"),
    (["train.pipeline_stages=2"], 1, "a pipeline run resumes on the same number \\(4 trainer ranks\\)"),
])
def test_a_resize_that_cannot_continue_exactly_is_refused(tmp_path, overrides, ranks, message):
    ckpt = _fake_checkpoint(tmp_path / "checkpoints", dp_world_size=2, train_batch_size=8)
    with pytest.raises(UserError, match=message):
        resume_plan(_cfg(*overrides), ckpt, "step2", ranks)


def test_ranks_another_launcher_started_say_what_to_run(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoints", dp_world_size=2, train_batch_size=8)
    with pytest.raises(UserError, match="pass train.grad_accum=4 to keep them"):
        rank_resume_plan(_cfg("train.grad_accum=2"), ckpt, 1)
    command = "python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder .*step2 "
    with pytest.raises(UserError, match=f"convert it first: {command}--output_folder .*step2_universal"):
        rank_resume_plan(_cfg("train.grad_accum=4"), ckpt, 1)
    (ckpt / "step2_universal").mkdir()
    assert rank_resume_plan(_cfg("train.grad_accum=4"), ckpt, 1).tag == "step2_universal"
    cfg = _cfg("train.grad_accum=2", "train.zero_stage=0")
    assert prepare_resize(cfg, ckpt, 1) == ["train.grad_accum=4"] and cfg.train.grad_accum == 4


def test_ds_mtp_launch_keeps_the_global_batch_when_it_leads(tmp_path):
    from types import SimpleNamespace

    from launcher.run import LaunchOptions, resize_overrides

    _fake_checkpoint(tmp_path / "run" / "checkpoints", dp_world_size=2, train_batch_size=8)
    plan = SimpleNamespace(leads=True, layout=SimpleNamespace(data_parallel=1))
    cfg = _cfg("train.grad_accum=2", "train.zero_stage=0")
    options = LaunchOptions(run_dir=str(tmp_path / "run"), resume=True)
    assert resize_overrides(options, plan, cfg) == ["train.grad_accum=4"]
    assert resize_overrides(LaunchOptions(run_dir=str(tmp_path / "run"), resume=True, dry_run=True), plan, cfg) == []
    plan.leads = False  # another node's ranks check by themselves (rank_resume_plan)
    assert resize_overrides(options, plan, cfg) == []


ARGS = ["model.preset=tiny", "model.mtp_k=2", "objective.lambda_latent=0", "train.seq_len=32", "train.micro_batch=2",
        "train.max_steps=4", "train.save_model=false"]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(run, token_data, *args):
    proc = run_cli("train", "--run-dir", str(run), f"data.path={token_data}", *ARGS, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_two_ranks_to_one_and_one_to_two_continues_the_losses(tmp_path, token_data):
    """ZeRO-3 (the default): 2 ranks x grad_accum 1 and 1 rank x grad_accum 2 read the same 4 windows per step."""
    reference = tmp_path / "reference"
    _train(reference, token_data, "--nproc", "2")
    cases = {"2->1": (["--nproc", "2"], [], "saved on 2 data-parallel rank(s), on 1", 2),
             "1->2": (["train.grad_accum=2"], ["--nproc", "2"], "saved on 1 data-parallel rank(s), on 2", 1)}
    for name, (first, then, said, grad_accum) in cases.items():
        run = tmp_path / name.replace("->", "_to_")
        _train(run, token_data, *first, "train.stop_after=2")
        proc = _train(run, token_data, "--resume", *then, *first[2:])
        assert said in proc.stdout and (run / "checkpoints" / "step2_universal").is_dir(), proc.stdout
        assert json.loads((run / "config.json").read_text())["train"]["grad_accum"] == grad_accum
        expected, got = _rows(reference), _rows(run)
        assert [r["step"] for r in got] == [1, 2, 3, 4], name
        for x, y in zip(expected, got):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6), (name, x["step"])
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (name, x["step"])
            assert y["tokens"] == x["tokens"], name
