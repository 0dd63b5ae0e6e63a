"""The embedded tasks' datasets as TensorFlow Datasets builders (``array_record``, no TensorFlow).

One registered builder per (task, kind), named ``rlhf_<task>_<kind>`` with kinds ``sft``,
``preferences``, ``rankings`` (K = 4) and ``prompts``; splits ``train`` / ``validation`` /
``test`` with the task's default sizes, seed 0 and the task's default labeller noise::

    from rlhf_jax.tasks.tfds_builders import builder_class
    builder_class("sentiment", "preferences")(data_dir=d).download_and_prepare()
    src = rlhf_jax.data.TfdsSource("rlhf_sentiment_preferences", split="train", data_dir=d)

Other sizes, seeds or noise levels: :func:`write_task_tfds` (a dataset named as you choose).
The records are exactly those of ``Task.sft_records`` etc., in the same order.
"""
from __future__ import annotations

import os
import types
from typing import Any

from rlhf_jax.data.tfds_io import RecordsBuilder, write_tfds_dataset
from rlhf_jax.tasks.base import SPLITS
from rlhf_jax.tasks.registry import get_task, list_tasks

import tensorflow_datasets as tfds

FEATURES = {
    "sft": {"prompt": "text", "completion": "text"},
    "preferences": {"prompt": "text", "chosen": "text", "rejected": "text"},
    "rankings": {"prompt": "text", "responses": "text_list", "ranks": "int_list"},
    "prompts": {"prompt": "text"},
}
KINDS = tuple(FEATURES)
RANKING_K = 4


def task_records(task_name: str, kind: str, split: str, *, noise: float | None = None, seed: int = 0,
                 num: int | None = None, k: int = RANKING_K) -> list[dict[str, Any]]:
    """The records of one (task, kind, split) in the data-layer format."""
    task = get_task(task_name)
    if kind == "sft":
        return task.sft_records(split, num=num, seed=seed)
    if kind == "preferences":
        return task.preference_records(split, noise, num=num, seed=seed)
    if kind == "rankings":
        return task.ranking_records(split, k, noise, num=num, seed=seed)
    if kind == "prompts":
        return task.prompt_records(split, num=num, seed=seed)
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")


def builder_name(task_name: str, kind: str) -> str:
    if kind not in FEATURES:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")
    return f"rlhf_{task_name}_{kind}"


def _make_builder(task_name: str, kind: str) -> type:
    name = builder_name(task_name, kind)
    task = get_task(task_name)

    def body(ns):
        ns.update(
            name=name, VERSION=tfds.core.Version("1.0.0"), FEATURES=FEATURES[kind],
            DESCRIPTION=(f"rlhf_jax embedded task {task_name!r} ({task.description}): {kind} records, "
                         f"seed 0, labeller noise {task.default_noise}"),
            split_records=lambda self: {s: (lambda s=s: task_records(task_name, kind, s)) for s in SPLITS},
            __module__=__name__)

    return types.new_class(f"Rlhf_{task_name}_{kind}", (RecordsBuilder,), {}, body)


# registered with TFDS on import (tfds.builder("rlhf_sentiment_sft", data_dir=...) finds them)
BUILDERS: dict[tuple[str, str], type] = {(t, k): _make_builder(t, k) for t in list_tasks() for k in KINDS}


def builder_class(task_name: str, kind: str) -> type:
    """The registered ``RecordsBuilder`` subclass of (task, kind)."""
    get_task(task_name)  # a clear error for an unknown task
    builder_name(task_name, kind)
    return BUILDERS[(task_name, kind)]


def write_task_tfds(task_name: str, kind: str, data_dir: str | os.PathLike, *, name: str | None = None,
                    noise: float | None = None, seed: int = 0, num: int | None = None,
                    overwrite: bool = False) -> str:
    """Writes one (task, kind) with custom ``noise``/``seed``/``num`` (per split) as TFDS dataset
    ``name`` (default ``rlhf_<task>_<kind>_s<seed>``) under ``data_dir``; returns its directory."""
    name = name or f"{builder_name(task_name, kind)}_s{seed}"
    by_split = {s: task_records(task_name, kind, s, noise=noise, seed=seed, num=num) for s in SPLITS}
    return write_tfds_dataset(by_split, name, data_dir, FEATURES[kind], overwrite=overwrite,
                              description=f"rlhf_jax task {task_name!r} {kind}, seed {seed}, noise {noise}")
