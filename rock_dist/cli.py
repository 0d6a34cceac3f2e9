"""Shared start-up for the `python -m rock_dist.X` entry points: one-line errors and exit codes.

Each entry point's `main(argv)` is wrapped by `run_cli`, so a `RockError` (bad file, bad flag, corrupt shard,
non-finite loss) prints `error: <message>` on stderr and exits non-zero without a traceback, and Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from rock_dist.errors import RockError


def answer_help_early(config_name: str, *, description: str | None = None, prog: str | None = None) -> None:
    """Print the help of `rock_dist.config.<config_name>` and exit when the command line asks for it.

    Called at the top of the entry modules that import torch, before those imports: `--help` then answers in a
    fraction of a second instead of the ~2-4 s torch takes to import. The parser is the same one `parse_config`
    builds, so the text is identical.
    """
    if not any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        return
    from rock_dist import config

    config.build_parser(getattr(config, config_name), description, prog).print_help()
    sys.exit(0)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit with its status; turn RockError and KeyboardInterrupt into clean exits."""
    try:
        status = main(argv)
    except RockError as err:
        # One write call: ranks of one job share the launcher's stderr, and print() would write the message and
        # its newline separately, letting another rank's line land in between.
        sys.stderr.write(f"{err.prefix}: {err}\n")
        sys.stderr.flush()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(status or 0)
