"""SFT at the ~1B Llama shape (Llama-3.2-1B), for accelerators (bf16 compute, fp32 master weights).

    rlhf-jax sft --config experiments/sft_llama1b.py model.path=/path/to/Llama-3.2-1B
    rlhf-jax sft --config experiments/sft_llama1b.py model.path=/path/to/Llama-3.2-1B data.path=sft.jsonl steps=2000

Without ``model.path`` the model is built from random weights at this shape (smoke runs and
benchmarks); with ``model.path=/path/to/Llama-3.2-1B`` (a Hugging Face directory: config.json, safetensors,
tokenizer) it is loaded from the checkpoint and the task's text is tokenised with ITS tokenizer.
Data: the embedded sentiment task's records by default; ``data.path=FILE`` (JSONL/Parquet/tfds:)
for your own.
"""
from rlhf_jax.data import DataConfig
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import MeshConfig, model_shape
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.sft import SFTConfig

# Llama-3.2-1B: 16 layers, d=2048, 32 heads (8 kv), vocab 128256, tied embeddings (1.24B parameters)
MODEL = model_shape("llama3.2-1b", dtype="bfloat16", param_dtype="float32", remat=True)


def get_config() -> SFTConfig:
    return SFTConfig(
        task="sentiment",
        model=MODEL,
        data=DataConfig(batch_size=32, max_length=256),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=50, weight_decay=0.01),
        mesh=MeshConfig(data=1, fsdp=-1),
        steps=1000,
        eval_every=200,
        eval_batches=8,
        checkpoint=CheckpointConfig(every=500, keep=2),
        log=LogConfig(every=10),
        out_dir="runs/sft_llama1b",
    )
