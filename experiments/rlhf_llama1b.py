"""The full pipeline at the ~1B Llama shape (Llama-3.2-1B trunk) on the sentiment task, for accelerators.

    rlhf-jax pipeline --config experiments/rlhf_llama1b.py --out runs/rlhf_llama1b
    rlhf-jax pipeline --config experiments/rlhf_llama1b.py --init-from /path/to/llama-dir --out runs/rlhf_llama1b_hf

The SFT trunk is built at this shape over the task's word-level vocabulary (random init), or loaded
from a Hugging Face directory with ``--init-from`` / ``init_from=`` (whose tokenizer must be the
task's, as the gold reward reads task token ids). The reward model starts from the SFT trunk and the
PPO policy/reference/value from the SFT and reward exports, so one shape flows through all stages.
"""
import dataclasses

from rlhf_jax.data import DataConfig
from rlhf_jax.pipeline import EvalSection, PipelineConfig
from rlhf_jax.rl import with_hparams
from rlhf_jax.training.configs import MeshConfig, ModelSection
from rlhf_jax.training.optim import OptimConfig

MODEL = ModelSection(
    name="tiny", arch="llama", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
    intermediate_size=8192, max_position_embeddings=2048, tie_word_embeddings=True, dtype="bfloat16",
    param_dtype="float32", remat=True)  # Llama-3.2-1B's trunk (tied embeddings) over the task's vocabulary
MESH = MeshConfig(data=1, fsdp=-1)


def get_config() -> PipelineConfig:
    base = PipelineConfig()
    return dataclasses.replace(
        base,
        task="sentiment",
        out_dir="runs/rlhf_llama1b",
        sft=dataclasses.replace(base.sft, model=MODEL, mesh=MESH, steps=1000,
                                data=DataConfig(batch_size=64, max_length=64),
                                optim=OptimConfig(learning_rate=3e-4, warmup_steps=100, weight_decay=0.01)),
        reward=dataclasses.replace(base.reward, mesh=MESH, steps=500,
                                   model=dataclasses.replace(base.reward.model, dtype="bfloat16"),
                                   optim=OptimConfig(learning_rate=1e-5, warmup_steps=20)),
        ppo=dataclasses.replace(base.ppo, mesh=MESH, iterations=200,
                                policy=dataclasses.replace(base.ppo.policy, dtype="bfloat16"),
                                ppo=with_hparams(base.ppo.ppo.replace(batch_size=128, minibatches=4), lr=1e-5)),
        eval=EvalSection(num_prompts=1024, batch_size=256, num_pairs=2048, curve_points=8),
    )
