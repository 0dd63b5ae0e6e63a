"""A Bradley–Terry reward model at the Llama-3.1-8B shape (plan: ``--topology v5p-16``).

    rlhf-jax plan --config experiments/reward_llama8b.py --topology v5p-16
    rlhf-jax reward --config experiments/reward_llama8b.py model.path=runs/sft_llama8b/export data.path=prefs.jsonl

Without ``model.path`` the trunk is built at this shape from random weights. 32 preference pairs × 2048
tokens per step, bf16 compute, float32 master weights, layers rematerialised, fsdp over all chips.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.reward import RewardConfig


def get_config() -> RewardConfig:
    return RewardConfig(
        task="sentiment",
        model=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat=True),
        data=DataConfig(batch_size=32, max_length=2048, pack=False),
        optim=OptimConfig(learning_rate=5e-6, warmup_steps=50, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1),
        steps=1000,
        eval_every=200,
        checkpoint=CheckpointConfig(every=200, keep=2),
        log=LogConfig(every=10),
        out_dir="runs/reward_llama8b",
    )
