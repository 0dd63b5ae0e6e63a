"""GRPO with LoRA at the Llama-3.1-8B shape: policy = frozen bf16 base + rank-16 adapters, reference =
the same base with the adapters off, reward = an 8B reward model (accelerators; a v5e-16 slice or more).

    rlhf-jax grpo --config experiments/grpo_lora_llama8b.py policy.path=/path/to/Llama-3.1-8B-sft \
        reward.path=/path/to/rm-8b

Without ``policy.path`` the base is built at the 8B shape from random weights. Memory per chip: the
base once (bf16, fsdp-sharded), the adapters and their Adam moments, the reward model (bf16), and the
activations of one minibatch with every layer rematerialised.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, GRPOConfig, GRPOHParams, GRPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig


def get_config() -> GRPOTrainConfig:
    return GRPOTrainConfig(
        task="sentiment",
        policy=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="bfloat16", remat=True,
                            lora_rank=16, lora_alpha=32.0),
        reward=RewardSection(kind="model", path="runs/reward_llama8b/export"),
        data=DataConfig(batch_size=16, max_length=512),
        grpo=GRPOConfig(batch_size=16, group_size=8, max_new_tokens=256, minibatches=8,
                        hparams=GRPOHParams(kl_coef=0.04, lr=1e-5)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        out_dir="runs/grpo_lora_llama8b",
    )
