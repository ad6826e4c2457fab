import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds_mtp.data import write_documents

REPO = Path(__file__).resolve().parent.parent


def make_token_data(path: Path, n_docs: int = 300, vocab: int = 64, seed: int = 0) -> Path:
    """Small learnable documents: runs of consecutive ids (mod 60) closed by EOS=61; pad=62."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([np.arange(s, s + rng.integers(5, 30)) % 60, [61]]) for s in rng.integers(0, 60, n_docs)]
    write_documents(path, {"train": docs}, vocab_size=vocab, special_ids={"pad": 62, "eos": 61})
    return path


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return make_token_data(tmp_path_factory.mktemp("data") / "tokens")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A frozen exported ds-mtp model of width 32 (vocab 64, like token_data's), for checkpoint: teachers."""
    import torch

    from ds_mtp.config import ModelConfig
    from ds_mtp.model import MTPModel, save_exported

    torch.manual_seed(0)
    model = MTPModel(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64, mtp_k=3))
    return save_exported(model, model.state_dict(), tmp_path_factory.mktemp("teacher") / "model")


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ds_mtp.cli ARGS`` in a fresh process (as a user would).

    The command runs in a session of its own with no standard input, and a command still running after
    ``timeout`` seconds is killed with every rank it started, so a hang fails its own test quickly instead
    of leaving ranks behind that slow or block the tests after it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    command = [sys.executable, "-m", "ds_mtp.cli", *args]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, err = proc.communicate()
        pytest.fail(f"ds-mtp {' '.join(args)} still ran after {timeout:g} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
