"""The one error type that reaches users as a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, command line). The CLI prints it on one line and exits 2."""

    exit_code = 2


def run_parsed(parser, argv: list[str] | None = None) -> int:
    """Parse argv and call the chosen subcommand's function; user errors become one line on stderr."""
    import sys

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
