"""``python -m launcher ARGS`` is ``ds-mtp launch ARGS``."""

import sys

from ds_mtp.cli import main

sys.exit(main(["launch", *sys.argv[1:]]))
