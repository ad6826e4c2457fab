"""The errors that reach users as a single line and a distinct exit code (the CLI prints ``error: MESSAGE``)."""


class UserError(Exception):
    """Bad input from the user (config, data, command line, files). The CLI prints it on one line and exits 2."""

    exit_code = 2


class Diverged(UserError):
    """Training stopped after train.max_bad_steps steps in a row with a non-finite loss or gradient norm."""

    exit_code = 4


EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM or SIGINT after saving a checkpoint: resume it with --resume
(75 is EX_TEMPFAIL of sysexits.h, "try again later"; docs/reliability.md)."""


class Preempted(UserError):
    """A run that SIGTERM / SIGINT stopped at a step boundary, with a checkpoint of that step."""

    exit_code = EXIT_PREEMPTED
