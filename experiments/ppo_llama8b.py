"""PPO with a KL penalty at the Llama-3.1-8B shape: policy, separate critic, reference and reward model, all
8B (plan: ``--topology v5p-16``).

    rlhf-jax plan --config experiments/ppo_llama8b.py --topology v5p-16 --json plan_ppo8b.json
    rlhf-jax ppo --config experiments/ppo_llama8b.py policy.path=runs/sft_llama8b/export \
        reward.path=runs/reward_llama8b/export

An iteration: 512 prompts of up to 512 tokens, 512 sampled tokens each, reward + reference + value
forwards, then 4 epochs × 8 minibatches (64 sequences each) of policy and critic updates, as one
compiled program. bf16 compute; the trained policy and critic keep float32 master weights and Adam
moments; the frozen reference and reward model are stored in bf16; every layer is rematerialised and
the policy's log-probs are computed 128 response tokens at a time (no whole [64, 512, 128256] f32
logits buffer). Without ``policy.path`` the policy is built at this shape from random weights; a
``reward.path`` that does not exist yet is planned as a reward model of the policy's shape.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig


def get_config() -> PPOTrainConfig:
    return PPOTrainConfig(
        task="sentiment",
        policy=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat=True, logits_chunk=128),
        value_init="reward",
        reward=RewardSection(kind="model", path="runs/reward_llama8b/export", param_dtype="bfloat16"),
        ref_param_dtype="bfloat16",
        data=DataConfig(batch_size=512, max_length=1024, max_prompt_length=512),
        ppo=PPOConfig(batch_size=512, max_new_tokens=512, ppo_epochs=4, minibatches=8, adaptive_kl=True,
                      hparams=PPOHParams(kl_coef=0.05, kl_target=6.0, lr=1e-6, temperature=1.0)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        checkpoint=CheckpointConfig(every=20, keep=2),
        log=LogConfig(every=1),
        iterations=200,
        sample_every=10,
        out_dir="runs/ppo_llama8b",
    )
