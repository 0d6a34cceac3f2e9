"""Shared start-up for the `python -m rock_dist.X` entry points: one-line errors and exit codes.

Each entry point's `main(argv)` is wrapped by `run_cli`, so a `RockError` (bad file, bad flag, corrupt shard,
non-finite loss) prints `error: <message>` on stderr and exits non-zero without a traceback, and Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from rock_dist.errors import RockError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit with its status; turn RockError and KeyboardInterrupt into clean exits."""
    try:
        status = main(argv)
    except RockError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(status or 0)
