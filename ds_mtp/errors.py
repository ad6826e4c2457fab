"""The one error type that reaches users as a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, command line). The CLI prints it on one line and exits 2."""

    exit_code = 2
