"""SFT at the Llama-3.1-8B shape, for a TPU slice (plan it first: ``rlhf-jax plan ... --topology v5p-16``).

    rlhf-jax plan --config experiments/sft_llama8b.py --topology v5p-16 --json plan_sft8b.json
    rlhf-jax sft --config experiments/sft_llama8b.py model.path=/path/to/Llama-3.1-8B data.path=sft.jsonl

Without ``model.path`` the model is built at this shape from random weights. bf16 compute, float32 master
weights and Adam moments, every layer rematerialised, params and optimiser state sharded over all chips
(``mesh.fsdp=-1``); 64 sequences × 2048 tokens per step.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.sft import SFTConfig


def get_config() -> SFTConfig:
    return SFTConfig(
        task="sentiment",
        model=model_shape("llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat=True),
        data=DataConfig(batch_size=64, max_length=2048),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=50, weight_decay=0.01),
        mesh=MeshConfig(data=1, fsdp=-1),
        steps=1000,
        eval_every=200,
        eval_batches=8,
        checkpoint=CheckpointConfig(every=200, keep=2),
        log=LogConfig(every=10),
        out_dir="runs/sft_llama8b",
    )
