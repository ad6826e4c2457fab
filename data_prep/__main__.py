"""``python -m data_prep ARGS`` is ``ds-mtp prep ARGS``."""

import sys

from ds_mtp.cli import prep_main

sys.exit(prep_main())
