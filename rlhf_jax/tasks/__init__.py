"""Embedded gold-reward tasks: generators, gold rewards (JAX and text), simulated labellers.

    task = get_task("sentiment")
    task.sft_records("train")                    # [{"prompt", "completion"}]
    task.preference_records("train", noise=0.1)  # [{"prompt", "chosen", "rejected"}]
    task.ranking_records("train", k=4)           # [{"prompt", "responses", "ranks"}], rank 0 = best
    task.prompt_records("test")                  # [{"prompt"}]
    task.gold_reward_jax(prompt_ids, prompt_mask, response_ids, response_mask)  # [B] in [0, 1]
"""
from rlhf_jax.tasks.arithmetic import ArithmeticTask
from rlhf_jax.tasks.base import DEFAULT_SIZES, SPLITS, Task, words_before_eos_mask
from rlhf_jax.tasks.labeller import (bradley_terry_prefers_first, bradley_terry_probability,
                                     plackett_luce_ranks)
from rlhf_jax.tasks.registry import DEFAULT_TASK, get_task, list_tasks
from rlhf_jax.tasks.sentiment import SentimentTask
from rlhf_jax.tasks.sorting import SortTask

__all__ = [
    "ArithmeticTask", "DEFAULT_SIZES", "DEFAULT_TASK", "SPLITS", "SentimentTask", "SortTask", "Task",
    "bradley_terry_prefers_first", "bradley_terry_probability", "get_task", "list_tasks",
    "plackett_luce_ranks", "words_before_eos_mask",
]
