"""No code from data files: a __reduce__ payload planted in any file ds-mtp reads is refused in one line, exit 2,
and never runs (ds_mtp.safe_load). The payload would create a marker file."""

import os
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_cli

TINY = ["model.preset=tiny", "train.seq_len=32", "train.micro_batch=2", "train.save_model=false"]


class Payload:
    """Unpickling it opens (creates) ``marker``: the smallest stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    """Add a payload entry to a checkpoint file ds-mtp wrote (read here with the full unpickler: we wrote it), and
    record the new size in the tag's COMPLETE.json as an attacker would, so the file reaches the loader."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["planted"] = Payload(marker)
    torch.save(state, path)
    complete = path.parent / "COMPLETE.json"
    if complete.is_file():
        marker_files = json.loads(complete.read_text())
        marker_files["files"][path.name] = path.stat().st_size
        complete.write_text(json.dumps(marker_files))


def _refused(proc, marker, path_part):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "holds pickled code or objects ds-mtp does not load" in lines[0], proc.stderr[-2000:]
    assert "asks for io.open" in lines[0] and path_part in lines[0]
    assert not marker.exists()


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, token_data):
    run = tmp_path_factory.mktemp("untrusted") / "run"
    proc = run_cli("train", "--run-dir", str(run), f"data.path={token_data}", *TINY, "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def planted_run(tmp_path, zero3_run):
    return shutil.copytree(zero3_run, tmp_path / "run"), tmp_path / "marker"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_export_and_resume_refuse_a_planted_payload(planted_run, tmp_path, token_data, kind):
    run, marker = planted_run
    (target,) = (run / "checkpoints" / "step2").glob(f"*{kind}.pt")
    plant(target, marker)
    _refused(run_cli("export", str(run), "--out", str(tmp_path / "model")), marker, target.name)
    assert not (tmp_path / "model").exists()
    _refused(run_cli("train", "--run-dir", str(run), "--resume", f"data.path={token_data}", *TINY,
                     "train.max_steps=3"), marker, target.name)


@pytest.mark.slow
def test_a_rank_resuming_by_itself_reads_deepspeeds_files_weights_only(planted_run, token_data):
    """The launching process's check aside (an external launcher may skip it): the engine's own loader refuses."""
    run, marker = planted_run
    (target,) = (run / "checkpoints" / "step2").glob("*optim_states.pt")
    plant(target, marker)
    from ds_mtp.ranks import free_port
    from ds_mtp.shm_buffers import remove_launch_buffers

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_MTP_PREPARED": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    try:
        proc = subprocess.run([sys.executable, "-m", "ds_mtp.cli", "train", "--run-dir", str(run), "--resume",
                               f"data.path={token_data}", *TINY, "train.max_steps=3"],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    finally:  # this test is the launcher of that rank
        remove_launch_buffers(port)
    _refused(proc, marker, target.name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_pipeline_checkpoints_layer_files_are_read_weights_only(tmp_path, token_data):
    run, marker = tmp_path / "run", tmp_path / "marker"
    proc = run_cli("train", "--run-dir", str(run), "--nproc", "2", f"data.path={token_data}", *TINY,
                   "train.max_steps=1", "train.pipeline_stages=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    layer = sorted((run / "checkpoints" / "step1").glob("layer_*-model_states.pt"))[-1]
    plant(layer, marker)
    _refused(run_cli("export", str(run), "--out", str(tmp_path / "model")), marker, layer.name)
    _refused(run_cli("train", "--run-dir", str(run), "--resume", f"data.path={token_data}", *TINY,
                     "train.max_steps=2", "train.pipeline_stages=2", "--nproc", "2"), marker, layer.name)


def test_an_exported_model_or_teacher_holding_a_pickle_is_refused(tmp_path, teacher_dir, token_data, capsys):
    """Exported models and checkpoint teachers are safetensors + JSON: a pickle in their place is not unpickled."""
    from ds_mtp.cli import main

    model, marker = shutil.copytree(teacher_dir, tmp_path / "model"), tmp_path / "marker"
    torch.save({"weights": Payload(marker)}, model / "model.safetensors")
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.path={token_data}", "model.preset=tiny",
                 "model.mtp_k=3", f"teacher.source=checkpoint:{model}", "train.seq_len=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot be read as safetensors" in err and not marker.exists()
    from ds_mtp.errors import UserError
    from ds_mtp.model import load_exported

    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_exported(model)
    assert not marker.exists()


def test_the_loader_refuses_code_and_reads_deepspeeds_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ds_mtp import safe_load
    from ds_mtp.errors import UserError

    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "stage": ZeroStageEnum.weights}, tmp_path / "ok.pt")
    loaded = safe_load.load(tmp_path / "ok.pt")
    assert loaded["stage"] == ZeroStageEnum.weights and loaded["scaler"].cur_scale == 1.0
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="bad.pt holds pickled code .* io.open"):
        safe_load.load(tmp_path / "bad.pt")
    with pytest.raises(UserError), safe_load.weights_only_torch_load():  # DeepSpeed's own calls, forced
        torch.load(tmp_path / "bad.pt", weights_only=False)
    assert torch.load is safe_load._ORIGINAL_TORCH_LOAD and not marker.exists()
