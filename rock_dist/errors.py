"""User-facing error types. Raised anywhere in rock_dist for bad input; entry points turn them into one clear line.

A `RockError` message must name the thing (file, flag, shard, rank) and the problem, and say what to do where that
is not obvious. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class RockError(Exception):
    """Bad input or environment the user can fix; printed as a single line, exit status 2."""

    exit_code = 2
    prefix = "error"  # how the entry points introduce the message


class DataError(RockError):
    """A dataset file, shard or manifest is missing, malformed or inconsistent."""


class ConfigError(RockError):
    """Flags or a checkpoint's stored configuration do not fit together."""


class CheckpointError(RockError):
    """A checkpoint or weights file could not be written (full disk, unwritable directory)."""


class NonFiniteLossError(RockError):
    """Training produced a NaN or infinite loss; all ranks stop at the same step."""

    exit_code = 3


class Preempted(RockError):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint of the step reached (not a failure of the
    run: resuming continues exactly). Exit status 143 = 128 + SIGTERM, what schedulers expect."""

    exit_code = 143
    prefix = "stopped"
