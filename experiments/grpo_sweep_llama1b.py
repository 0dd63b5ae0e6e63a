"""The base of a 16-run vmapped GRPO sweep at the Llama-3.2-1B shape (4 learning rates × 4 seeds), one
compiled program with its runs spread over a ``runs`` mesh axis (plan: ``--topology v5e-64``).

    rlhf-jax plan --config experiments/grpo_sweep_llama1b.py --topology v5e-64 \
        --vmap-grid grpo.lr=5e-7,1e-6,2e-6,4e-6 --seeds 4 --mesh runs=16,fsdp=4
    rlhf-jax sweep experiments/grpo_sweep_llama1b.py --vmap --grid grpo.lr=5e-7,1e-6,2e-6,4e-6 --seeds 4 \
        --mesh runs=16,fsdp=4 --out runs/grpo_sweep_llama1b policy.path=runs/sft_llama1b/export

One run of the sweep alone (on 4 chips): ``rlhf-jax grpo --config experiments/grpo_sweep_llama1b.py mesh.runs=1``.

Each run: 16 prompts × 8 samples of 256 tokens after prompts of up to 256, 2 minibatches, its own policy
(bf16 compute, float32 master weights, bf16 Adam moments) and reference (bf16); the reward (the sentiment
task's gold reward here; a reward model is shared by all runs) is computed inside the program. Each run's
params and optimiser state are sharded over its 4 chips (fsdp=4).
"""
import dataclasses

from rlhf_jax.data import DataConfig
from rlhf_jax.rl import RL_OPTIM, GRPOConfig, GRPOHParams, GRPOTrainConfig, RewardSection
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig


def get_config() -> GRPOTrainConfig:
    return GRPOTrainConfig(
        task="sentiment",
        policy=model_shape("llama3.2-1b", dtype="bfloat16", param_dtype="float32", remat=True, logits_chunk=128),
        reward=RewardSection(kind="gold"),
        ref_param_dtype="bfloat16",
        data=DataConfig(batch_size=16, max_length=512, max_prompt_length=256),
        grpo=GRPOConfig(batch_size=16, group_size=8, max_new_tokens=256, epochs=1, minibatches=2,
                        hparams=GRPOHParams(kl_coef=0.04, lr=1e-6)),
        optim=dataclasses.replace(RL_OPTIM, state_dtype="bfloat16"),
        mesh=MeshConfig(runs=16, data=1, fsdp=4),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=1),
        iterations=100,
        sample_every=10,
        out_dir="runs/grpo_sweep_llama1b",
    )
