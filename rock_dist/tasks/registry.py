"""The one ordered list of auxiliary tasks: the order tasks are built, trained, counted, logged and reported in.

Read by every consumer of the tasks (rock_dist.model.rock_block, rock_dist.model.losses, rock_dist.model.builder,
rock_dist.engine.normalization, rock_dist.engine.metrics, rock_dist.engine.tensorboard, rock_dist.engine.console,
rock_dist.engine.evaluation, rock_dist.engine.synthetic_batch, rock_dist.data.transforms, rock_dist.data.batch,
rock_dist.data.device_augment, rock_dist.detect). The built-in tasks are the entries of the torch-free
rock_dist.tasks.catalog, each naming the module of its `AuxTask`: adding a task is a module defining its `AuxTask`
and its entry in the catalog (docs/architecture.md, "Auxiliary tasks"); `register` adds one at run time (tests,
experiments).
"""

from __future__ import annotations

import importlib
from typing import Iterable

from rock_dist.tasks import catalog
from rock_dist.tasks.base import AuxTask
from rock_dist.tasks.listing import Listing


def _load(spec: catalog.TaskSpec) -> AuxTask:
    """The `AuxTask` a catalog entry names ("module:ATTRIBUTE"), checked to be that task."""
    module, attribute = spec.task.split(":")
    task = getattr(importlib.import_module(module), attribute)
    if not isinstance(task, AuxTask) or task.name != spec.name:
        raise TypeError(f"{spec.task} is not the AuxTask of the catalog's task {spec.name!r}")
    return task


_TASKS: Listing[AuxTask] = Listing("auxiliary task", (_load(spec) for spec in catalog.builtin()))
names = _TASKS.names
all_tasks = _TASKS.entries
get = _TASKS.get
register = _TASKS.register
unregister = _TASKS.unregister


def select(task_names: Iterable[str]) -> tuple[AuxTask, ...]:
    """The tasks of `task_names`, in that order (a trained model's `ModelConfig.tasks`)."""
    return tuple(get(name) for name in task_names)


__all__ = ["names", "all_tasks", "get", "select", "register", "unregister"]
