"""The embedded tasks' datasets through TFDS (array_record): records read back equal the task's."""
from __future__ import annotations

import pytest

from rlhf_jax.data import TfdsSource
from rlhf_jax.tasks import get_task
from rlhf_jax.tasks.tfds_builders import KINDS, builder_class, task_records, write_task_tfds


def _read(name, split, data_dir):
    src = TfdsSource(name, split=split, data_dir=str(data_dir))
    return [src.get(i)[0] for i in range(len(src))]


def test_registered_builder_round_trip(tmp_path):
    cls = builder_class("sort", "prompts")
    cls(data_dir=str(tmp_path)).download_and_prepare()
    task = get_task("sort")
    for split in ("train", "test"):
        assert _read("rlhf_sort_prompts", split, tmp_path) == task.prompt_records(split)


@pytest.mark.parametrize("kind", KINDS)
def test_write_task_tfds_round_trip(kind, tmp_path):
    write_task_tfds("sentiment", kind, tmp_path, noise=0.2, seed=3, num=12)
    got = _read(f"rlhf_sentiment_{kind}_s3", "validation", tmp_path)
    want = task_records("sentiment", kind, "validation", noise=0.2, seed=3, num=12)
    assert got == want and len(got) == 12


def test_unknown_kind_and_task():
    with pytest.raises(ValueError, match="unknown dataset kind 'pairs'"):
        builder_class("sentiment", "pairs")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        builder_class("nope", "sft")
