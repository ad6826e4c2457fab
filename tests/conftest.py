import os
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


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ds_mtp.cli ARGS`` in a fresh process (as a user would)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "ds_mtp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
