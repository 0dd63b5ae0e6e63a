"""The full pipeline on the default (sentiment) task: SFT -> reward model -> PPO -> gold evaluation.

    rlhf-jax pipeline --config experiments/rlhf_sentiment_tiny.py --out runs/rlhf_sentiment
    rlhf-jax pipeline --config experiments/rlhf_sentiment_tiny.py --seed 1 ppo.ppo.kl_target=3 --out runs/kl3

CPU-sized (the task's tiny model, a few minutes on 2 cores). The stage sections are the trainers'
own configs (``sft.*``, ``reward.*``, ``ppo.*``); the pipeline chains their models and sets task,
seed and output directories. Writes summary.json/summary.md and the PNG plots into ``--out``.
"""
import dataclasses

from rlhf_jax.pipeline import EvalSection, PipelineConfig


def get_config() -> PipelineConfig:
    base = PipelineConfig()
    return dataclasses.replace(
        base,
        task="sentiment",
        seed=0,
        out_dir="runs/rlhf_sentiment_tiny",
        label_noise=-1.0,
        reward_from_sft=True,
        sft=dataclasses.replace(base.sft, steps=200),
        reward=dataclasses.replace(base.reward, steps=200),
        ppo=dataclasses.replace(base.ppo, iterations=40),
        eval=EvalSection(num_prompts=256, num_pairs=512, curve_points=4),
    )
