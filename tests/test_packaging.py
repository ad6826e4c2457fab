"""A plain (non-editable) install works: the wheel carries everything `ds-mtp train` needs, the
DeepSpeed configs included, and trains from a directory outside the source tree.

Fast by construction: the wheel is built without build isolation, and the fresh venv gets its
dependencies (torch, DeepSpeed, ...) from this interpreter's site-packages through a .pth line instead
of installing them. A .pth line does not run that directory's own .pth files, so an editable install
of ds-mtp there stays invisible: the test checks that ds_mtp is imported from the fresh venv."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from ds_mtp.monitor import read_metrics
from tests.conftest import REPO

# What a source copy for the build leaves out: VCS data, environments and build outputs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".whl")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, command))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _outside_env() -> dict:
    """This process's environment without what would point Python at the source tree or a launcher."""
    drop = {"PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_one_step_outside_the_tree(tmp_path, token_data):
    # The wheel, built from a copy so that the build writes nothing into the source tree.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "wheels", source])
    wheel, = (tmp_path / "wheels").glob("ds_mtp-*.whl")
    shutil.rmtree(source)

    # A fresh venv that sees this interpreter's packages (not its editable ds-mtp) and installs the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import ds_configs, ds_mtp; print(ds_mtp.__file__); print(ds_configs.__file__)"],
                 cwd=elsewhere, env=_outside_env()).stdout.split()
    assert all(Path(f).is_relative_to(env_dir) for f in where), where

    run = elsewhere / "run"
    _run([env_dir / "bin" / "ds-mtp", "train", "--run-dir", "run", "--data", token_data, "model.preset=tiny",
          "model.mtp_k=2", "train.seq_len=16", "train.micro_batch=2", "train.max_steps=1", "train.save_model=false"],
         cwd=elsewhere, env={**_outside_env(), "OMP_NUM_THREADS": "1"})
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [1]
    assert json.loads((run / "config.json").read_text())["train"]["ds_config"] == ""  # the shipped default
