"""User-facing error types. Raised anywhere in rock_dist for bad input; entry points turn them into one clear line.

A `RockError` message must name the thing (file, flag, shard, rank) and the problem, and say what to do where that
is not obvious. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class RockError(Exception):
    """Bad input or environment the user can fix; printed as a single line, exit status 2."""

    exit_code = 2


class DataError(RockError):
    """A dataset file, shard or manifest is missing, malformed or inconsistent."""


class ConfigError(RockError):
    """Flags or a checkpoint's stored configuration do not fit together."""


class NonFiniteLossError(RockError):
    """Training produced a NaN or infinite loss; all ranks stop at the same step."""

    exit_code = 3
