"""GRPO (G=8) at the ~1B Llama shape (Llama-3.2-1B) against the task's gold reward on decoded text (accelerators).

    rlhf-jax grpo --config experiments/grpo_llama1b.py                        # after sft_llama1b.py
    rlhf-jax grpo --config experiments/grpo_llama1b.py policy.path=/path/to/Llama-3.2-1B reward.function=mymod:score

``reward.kind="python"`` scores decoded text on the host (``reward.function`` = ``module:name``;
empty = the sentiment task's ``gold_reward_text``), so it works with any checkpoint's tokenizer.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.rl import RL_OPTIM, GRPOConfig, GRPOHParams, GRPOTrainConfig, RewardSection


def get_config() -> GRPOTrainConfig:
    return GRPOTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_llama1b/export", dtype="bfloat16", remat=True),
        reward=RewardSection(kind="python"),
        data=DataConfig(batch_size=16, max_length=256),
        grpo=GRPOConfig(batch_size=16, group_size=8, max_new_tokens=64, minibatches=4,
                        hparams=GRPOHParams(kl_coef=0.04, lr=1e-6)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        out_dir="runs/grpo_llama1b",
    )
