"""Console scripts (`[project.scripts]` in pyproject.toml): `rock-train ARGS` is `python -m rock_dist.train ARGS`.

Each script runs its module the way `python -m` does (`runpy.run_module` as `__main__`), so whatever holds for
`python -m rock_dist.X` holds for the script: `--help` answered before torch is imported (`cli.answer_help_early`
in the module's `__main__` block), one-line errors and exit codes (`cli.run_cli`), worker processes started with
the spawn method finding the module. The only difference is the name: usage lines and recorded command lines say
`rock-train` (`invocation.command_words`). This module imports nothing heavy, so a script starts as fast as
`python -m`.
"""

from __future__ import annotations

import runpy
from typing import Callable

from rock_dist import invocation

# script name -> the module it runs (`python -m MODULE`)
SCRIPTS: dict[str, str] = {
    "rock-train": "rock_dist.train",
    "rock-shards": "rock_dist.shards",
    "rock-evaluate": "rock_dist.evaluate",
    "rock-detect": "rock_dist.detect",
    "rock-export": "rock_dist.export",
    "rock-bench": "rock_dist.bench",
    "rock-quickstart": "rock_dist.quickstart",
    "rock-create-image-folder": "rock_dist.create_image_folder",
    "rock-rooms": "rock_dist.synthetic.rooms",
    "rock-data-bench": "rock_dist.perf.data_bench",
}


def run_script(script: str) -> None:
    """Run the module of console script `script` as `python -m` would, with the command line of this process."""
    module = SCRIPTS[script]
    invocation.set_console_script(script, module)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _entry(script: str) -> Callable[[], None]:
    """The zero-argument function `[project.scripts]` calls for `script`."""
    def run() -> None:
        run_script(script)

    run.__name__ = run.__qualname__ = script.removeprefix("rock-").replace("-", "_")
    run.__doc__ = f"`{script} ARGS` = `python -m {SCRIPTS[script]} ARGS`."
    return run


train = _entry("rock-train")
shards = _entry("rock-shards")
evaluate = _entry("rock-evaluate")
detect = _entry("rock-detect")
export = _entry("rock-export")
bench = _entry("rock-bench")
quickstart = _entry("rock-quickstart")
create_image_folder = _entry("rock-create-image-folder")
rooms = _entry("rock-rooms")
data_bench = _entry("rock-data-bench")


__all__ = ["SCRIPTS", "run_script", "train", "shards", "evaluate", "detect", "export", "bench", "quickstart",
           "create_image_folder", "rooms", "data_bench"]
