import json

import pytest

from ds_mtp.cli import main
from ds_mtp.monitor import read_metrics
from tests.conftest import run_cli

COMMON = ["model.preset=tiny", "model.mtp_k=3", "train.seq_len=32", "train.micro_batch=4"]


def keys_for(K):
    return {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib",
            *(f"ce_{k}" for k in range(1, K + 1)), *(f"acc_{k}" for k in range(1, K + 1)),
            *(f"latent_{k}" for k in range(2, K + 1)), *(f"semantic_{k}" for k in range(2, K + 1))}


@pytest.mark.slow
def test_single_process_run_writes_metrics_tensorboard_and_model(tmp_path, token_data):
    run = tmp_path / "run"
    result = run_cli("train", "--run-dir", str(run), f"data.path={token_data}", *COMMON, "train.max_steps=30",
                     "train.lr=3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) == keys_for(3)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert rows[-1]["tokens"] == 30 * 4 * 32
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step30"


def test_existing_run_is_not_overwritten(tmp_path, token_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code = main(["train", "--run-dir", str(run), f"data.path={token_data}", *COMMON])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def _losses(run):
    return [(r["step"], r["loss"], r["ce_2"], r["latent_3"]) for r in read_metrics(run / "metrics.jsonl")]


def _resume_matches_uninterrupted(tmp_path, token_data, nproc_args):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [f"data.path={token_data}", *COMMON, "train.max_steps=6", "train.grad_accum=2"]
    r = run_cli("train", *nproc_args, "--run-dir", str(full), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", *nproc_args, "--run-dir", str(resumed), *args, "train.stop_after=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_metrics(resumed / "metrics.jsonl")) == 3 and not (resumed / "model").exists()
    # A killed run may have logged steps past its last checkpoint: resume drops and rewrites them.
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    r = run_cli("train", *nproc_args, "--run-dir", str(resumed), "--resume", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(resumed) == _losses(full)


@pytest.mark.slow
def test_resume_is_exact_single_process(tmp_path, token_data):
    _resume_matches_uninterrupted(tmp_path, token_data, [])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_is_exact_two_rank_zero3(tmp_path, token_data):
    _resume_matches_uninterrupted(tmp_path, token_data, ["--nproc", "2"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_rank_zero3_matches_one_rank_gradients(tmp_path, token_data):
    """Two ranks with micro-batch 2 see the same 4 windows per step as one rank with micro-batch 2 and
    two accumulation steps: the same averaged gradient, so the same losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [f"data.path={token_data}", *COMMON, "train.max_steps=4", "train.micro_batch=2"]
    r = run_cli("train", "--run-dir", str(one), *args, "train.grad_accum=2", "objective.lambda_latent=0")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--nproc", "2", "--run-dir", str(two), *args, "objective.lambda_latent=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZeRO-3, 2 rank(s)" in r.stdout
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["model.mtp_k=0"], "mtp_k must be at least 1"),
    (["model.mtp_k=32"], "smaller than train.seq_len"),
    (["objective.lambda_semantic=-0.5"], "non-negative"),
    (["model.head_type=tree"], "unknown head type"),
    (["model.preset=gpt5"], "unknown model preset"),
    (["model.vocab_size=50"], "token id 61, not below the model's vocab_size=50"),
    (["data.path=/nonexistent/data"], "data directory not found"),
    (["train.pipeline_stages=2", "train.zero_stage=3"], "does not combine pipeline parallelism with ZeRO-2/3"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, token_data, capsys, overrides, message):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", *COMMON, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_data_given_exits_2_in_a_real_process(tmp_path):
    r = run_cli("train", "--run-dir", str(tmp_path / "run"), "model.preset=tiny")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: no training data: set data.path=DIR (a directory written by "
                                             "ds-mtp prep or ds-mtp world make)"]


@pytest.mark.parametrize("env, cores, threads", [
    ({}, 16, 16),                                                     # a plain process takes the machine
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "4"}, 16, 4),  # deepspeed: 4 ranks here
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "2"}, 16, 8),  # 2 of 8 ranks on this node
    ({"RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3", "WORLD_SIZE": "6"}, 16, 5),  # torchrun
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALNRANKS": "3"}, 2, 1),  # MPICH: 2 trainers + 1 teacher, 2 cores
    ({"PMI_RANK": "0", "PMI_SIZE": "3"}, 6, 2),                       # a launcher that says nothing of its node
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "4", "OMP_NUM_THREADS": "2"}, 16, 2),
])
def test_cpu_threads_share_the_node_between_its_ranks(env, cores, threads):
    from ds_mtp.train import cpu_threads

    assert cpu_threads(env, cores) == threads


def test_free_port_and_the_next_are_below_the_ephemeral_range():
    """Outgoing connections take local ports from the ephemeral range: a master port picked there could be
    taken before a rank listens on it (EADDRINUSE with a teacher bridge on MASTER_PORT + 1)."""
    from pathlib import Path

    from ds_mtp.ranks import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert all(1024 <= p and p + 1 < low for p in ports)
