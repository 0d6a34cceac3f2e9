"""How this process was started: the command as the user typed it (`python -m rock_dist.X` or a console script such
as `rock-train`) and the whole command line.

Used by `rock_dist.config` (usage lines name the command), the entry points and `rock_dist.engine.weights` (the
command recorded as provenance); `rock_dist.scripts` says which console script started the process. It imports
nothing from rock_dist, so that all of them can use it without an import cycle.
"""

from __future__ import annotations

import shlex
import sys

# (script name, module) when a console script (rock_dist.scripts) started this process, else None.
_console_script: tuple[str, str] | None = None


def set_console_script(script: str, module: str) -> None:
    """Record that the console script `script` runs `module` (called by `rock_dist.scripts` before it runs it)."""
    global _console_script
    _console_script = (script, module)


def main_module() -> str | None:
    """`rock_dist.X` when this process runs `python -m rock_dist.X` (so do the ranks of `accelerate launch -m`, and
    the console scripts, which run the module the same way), else None: then argv[0] is a file path that does not say
    how the user started the command."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("rock_dist") else None


def command_words(module: str) -> list[str]:
    """The command of `module` (`rock_dist.train`) as the user typed it: `["rock-train"]` when its console script
    started this process, else `["python", "-m", "rock_dist.train"]`."""
    if _console_script is not None and _console_script[1] == module:
        return [_console_script[0]]
    return ["python", "-m", module]


def command_name(module: str) -> str:
    """`command_words(module)` as one string, for usage lines: `rock-train` or `python -m rock_dist.train`."""
    return shlex.join(command_words(module))


def command_line() -> str:
    """This process's command line as the user typed it (`python -m rock_dist.train --lr 0.001 ...`,
    `rock-train --lr 0.001 ...`), for records."""
    module = main_module()
    return shlex.join([*command_words(module), *sys.argv[1:]] if module else sys.argv)


__all__ = ["set_console_script", "main_module", "command_words", "command_name", "command_line"]
