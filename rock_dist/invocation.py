"""How this process was started: the `python -m rock_dist.X` module and the command line as the user typed it.

Used by `rock_dist.config` (usage lines name the command) and `rock_dist.engine.weights` (the command recorded as
provenance). It imports nothing from rock_dist, so that both can use it without an import cycle.
"""

from __future__ import annotations

import shlex
import sys


def main_module() -> str | None:
    """`rock_dist.X` when this process runs `python -m rock_dist.X` (so do the ranks of `accelerate launch -m`),
    else None: then argv[0] is a file path that does not say how the user started the command."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("rock_dist") else None


def command_line() -> str:
    """This process's command line as the user typed it (`python -m rock_dist.train --lr 0.001 ...`), for records."""
    module = main_module()
    return shlex.join(["python", "-m", module, *sys.argv[1:]] if module else sys.argv)


__all__ = ["main_module", "command_line"]
