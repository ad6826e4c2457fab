"""One cache of compiled DeepSpeed/torch extensions per Python environment.

torch builds DeepSpeed's ops (the CPU ``shm`` all-reduce, a C++ build) into TORCH_EXTENSIONS_DIR,
by default ``~/.cache/torch_extensions``, shared by every environment of the user. A build is keyed on
its sources and build flags, which hold the environment's include paths, so two environments (two
clones, or a clone and a test run) take turns rebuilding it.
``ds-mtp`` gives each environment its own cache unless the user chose one: set once where ds-mtp starts
(``ds_mtp.cli.main``), before any rank is launched, so every rank inherits it and on other nodes each rank's
own ``ds-mtp`` start sets the same path.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def environment_extensions_dir(prefix: str | None = None) -> Path:
    """``<sys.prefix>/torch_extensions`` when the environment is writable (a virtual environment), else a
    directory of the user's cache named after the environment's path (a system Python)."""
    prefix = prefix or sys.prefix
    if os.access(prefix, os.W_OK):
        return Path(prefix) / "torch_extensions"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions" / f"env-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"


def use_environment_extensions_dir(env=os.environ) -> str:
    """Set TORCH_EXTENSIONS_DIR to this environment's cache unless it is set already; returns the value."""
    if not env.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = str(environment_extensions_dir())
    return env["TORCH_EXTENSIONS_DIR"]
