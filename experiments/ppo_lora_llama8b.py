"""PPO with LoRA at the Llama-3.1-8B shape: policy = frozen bf16 base + rank-16 adapters, reference = the
same base with the adapters off, value model = the policy's trunk copy with its own adapters and head,
reward = an 8B reward model (accelerators).

    rlhf-jax ppo --config experiments/ppo_lora_llama8b.py policy.path=/path/to/Llama-3.1-8B-sft \
        reward.path=/path/to/rm-8b
    rlhf-jax ppo --config experiments/ppo_lora_llama8b.py ppo.value_model=shared   # no second trunk

Without ``policy.path`` the base is built at the 8B shape from random weights.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig


def get_config() -> PPOTrainConfig:
    return PPOTrainConfig(
        task="sentiment",
        policy=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="bfloat16", remat=True,
                            lora_rank=16, lora_alpha=32.0),
        reward=RewardSection(kind="model", path="runs/reward_llama8b/export"),
        data=DataConfig(batch_size=64, max_length=512),
        ppo=PPOConfig(batch_size=64, max_new_tokens=256, ppo_epochs=2, minibatches=8,
                      hparams=PPOHParams(kl_coef=0.05, lr=1e-5)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        out_dir="runs/ppo_lora_llama8b",
    )
