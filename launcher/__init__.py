"""Launching ds-mtp training: hostfiles, pre-flight checks, and the deepspeed / mpirun command lines.

``ds-mtp launch`` (or ``python -m launcher``) checks a launch before anything starts, prints the
exact command and runs it; see docs/launching.md.
"""

from launcher.run import LaunchOptions, launch, plan_launch

__all__ = ["LaunchOptions", "launch", "plan_launch"]
