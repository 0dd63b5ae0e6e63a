"""Task registry: ``get_task(name)`` and ``list_tasks()``."""
from __future__ import annotations

import functools

from rlhf_jax.tasks.arithmetic import ArithmeticTask
from rlhf_jax.tasks.base import Task
from rlhf_jax.tasks.sentiment import SentimentTask
from rlhf_jax.tasks.sorting import SortTask

#: name -> class; the first one is the default task of the pipeline
_TASKS: dict[str, type[Task]] = {"sentiment": SentimentTask, "sort": SortTask, "arith": ArithmeticTask}
DEFAULT_TASK = "sentiment"


def list_tasks() -> list[str]:
    """Names of the embedded tasks (the default one first)."""
    return list(_TASKS)


@functools.cache
def get_task(name: str = DEFAULT_TASK) -> Task:
    """The embedded task called ``name`` (one shared, stateless instance per name)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list_tasks()}")
    return _TASKS[name]()
