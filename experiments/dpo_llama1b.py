"""DPO (sigmoid, β=0.1) at the ~1B Llama shape (Llama-3.2-1B) from the SFT policy (accelerators).

    rlhf-jax dpo --config experiments/dpo_llama1b.py                          # after sft_llama1b.py
    rlhf-jax dpo --config experiments/dpo_llama1b.py policy.path=/path/to/Llama-3.2-1B data.path=prefs.jsonl dpo.beta=0.05
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.rl import RL_OPTIM, DPOConfig, DPOHParams, DPOTrainConfig


def get_config() -> DPOTrainConfig:
    return DPOTrainConfig(
        task="sentiment",
        policy=ModelSection(path="runs/sft_llama1b/export", dtype="bfloat16", remat=True),
        data=DataConfig(batch_size=32, max_length=256, pack=False),
        dpo=DPOConfig(loss_type="sigmoid", hparams=DPOHParams(beta=0.1, lr=5e-7)),
        optim=RL_OPTIM,
        mesh=MeshConfig(data=1, fsdp=-1),
        steps=500,
        eval_every=100,
        eval_batches=8,
        checkpoint=CheckpointConfig(every=250, keep=2),
        log=LogConfig(every=10),
        out_dir="runs/dpo_llama1b",
    )
