"""The one ordered list of auxiliary tasks: the order tasks are built, trained, counted, logged and reported in.

Read by every consumer of the tasks (rock_dist.model.rock_block, rock_dist.model.losses, rock_dist.model.builder,
rock_dist.engine.normalization, rock_dist.engine.metrics, rock_dist.engine.tensorboard, rock_dist.engine.console,
rock_dist.engine.evaluation, rock_dist.engine.synthetic_batch, rock_dist.data.transforms, rock_dist.data.batch,
rock_dist.data.device_augment, rock_dist.detect). Adding a task: a module defining its `AuxTask` and one line in
`_BUILTIN` below (docs/architecture.md, "Auxiliary tasks"); `register` adds one at run time (tests, experiments).
`rock_dist.config.AUX_TASKS` repeats the built-in names because the command line is parsed without importing torch;
tests/test_tasks.py checks that the two agree.
"""

from __future__ import annotations

from typing import Iterable

from rock_dist.tasks.base import AuxTask
from rock_dist.tasks.depth import DEPTH
from rock_dist.tasks.normals import NORMALS
from rock_dist.tasks.scene import SCENE

_BUILTIN: tuple[AuxTask, ...] = (
    SCENE,
    DEPTH,
    NORMALS,
)
_TASKS: dict[str, AuxTask] = {task.name: task for task in _BUILTIN}


def names() -> tuple[str, ...]:
    """Names of the registered tasks, in registry order."""
    return tuple(_TASKS)


def all_tasks() -> tuple[AuxTask, ...]:
    """The registered tasks, in registry order."""
    return tuple(_TASKS.values())


def get(name: str) -> AuxTask:
    """The task called `name` (KeyError naming the registered ones when there is none)."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown auxiliary task {name!r}; registered: {' '.join(_TASKS)}") from None


def select(task_names: Iterable[str]) -> tuple[AuxTask, ...]:
    """The tasks of `task_names`, in that order (a trained model's `ModelConfig.tasks`)."""
    return tuple(get(name) for name in task_names)


def register(task: AuxTask) -> AuxTask:
    """Add `task` after the registered ones (ValueError if its name is taken); returns it."""
    if task.name in _TASKS:
        raise ValueError(f"an auxiliary task called {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task added with `register` (the built-in ones stay)."""
    if any(task.name == name for task in _BUILTIN):
        raise ValueError(f"{name!r} is a built-in task")
    _TASKS.pop(name, None)


__all__ = ["names", "all_tasks", "get", "select", "register", "unregister"]
