"""GRPO (G = 8, no critic) at the Llama-3.1-8B shape: policy, reference and reward model all 8B (plan:
``--topology v5p-16``).

    rlhf-jax plan --config experiments/grpo_llama8b.py --topology v5p-16 --json plan_grpo8b.json
    rlhf-jax grpo --config experiments/grpo_llama8b.py policy.path=runs/sft_llama8b/export \
        reward.path=runs/reward_llama8b/export

An iteration: 64 prompts × 8 samples = 512 responses of 512 tokens after prompts of up to 512, reward and
reference forwards, then 4 epochs × 8 minibatches of 64 sequences, as one compiled program. bf16 compute,
float32 master weights and Adam moments for the policy, bf16 reference and reward model, layers
rematerialised, log-probs in chunks of 128 tokens. Without ``policy.path`` the policy is random at this
shape; a ``reward.path`` that does not exist yet is planned at the policy's shape.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, GRPOConfig, GRPOHParams, GRPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig


def get_config() -> GRPOTrainConfig:
    return GRPOTrainConfig(
        task="sentiment",
        policy=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat=True, logits_chunk=128),
        reward=RewardSection(kind="model", path="runs/reward_llama8b/export", param_dtype="bfloat16"),
        ref_param_dtype="bfloat16",
        data=DataConfig(batch_size=64, max_length=1024, max_prompt_length=512),
        grpo=GRPOConfig(batch_size=64, group_size=8, max_new_tokens=512, epochs=4, minibatches=8,
                        hparams=GRPOHParams(kl_coef=0.04, lr=1e-6)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=20, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        out_dir="runs/grpo_llama8b",
    )
