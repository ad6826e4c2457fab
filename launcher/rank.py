"""Entry script for back-ends that start a file rather than a module (DeepSpeed's slurm runner):
``python launcher/rank.py ARGS`` is ``python -m ds_mtp.cli ARGS``."""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not launcher/ (whose names would shadow)

from ds_mtp.cli import main  # noqa: E402

sys.exit(main())
