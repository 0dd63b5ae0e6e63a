"""The full pipeline on the sort task (SFT -> reward model -> PPO -> gold evaluation), CPU-sized.

    rlhf-jax pipeline --config experiments/rlhf_sort_tiny.py --out runs/rlhf_sort
    rlhf-jax sweep experiments/rlhf_sort_tiny.py --grid label_noise=0.05,0.5 --seeds 3 --out runs/noise
"""
import dataclasses

from rlhf_jax.pipeline import EvalSection, PipelineConfig


def get_config() -> PipelineConfig:
    base = PipelineConfig()
    return dataclasses.replace(
        base,
        task="sort",
        out_dir="runs/rlhf_sort_tiny",
        sft=dataclasses.replace(base.sft, steps=200),
        reward=dataclasses.replace(base.reward, steps=200),
        ppo=dataclasses.replace(base.ppo, iterations=40),
        eval=EvalSection(num_prompts=256, num_pairs=512, curve_points=4),
    )
