"""Online DPO on the sort task: each iteration samples two responses per prompt from the current policy,
the gold reward picks the chosen one, and the pairs are trained with DPO's sigmoid loss against the
frozen starting policy, all in one compiled program (CPU, ~1 min). Same model, prompts and optimiser as
experiments/grpo_sort_tiny.py; 16 prompts (32 samples) per iteration, as GRPO's 8 x 4. Like that file it
starts from the task's tiny policy at random init, where most pairs tie (both near 0 gold) and little is
learnt in 40 iterations; start from an SFT export (policy.path=, second command) for a real run.

    rlhf-jax online_dpo --config experiments/online_dpo_sort_tiny.py
    rlhf-jax online_dpo --config experiments/online_dpo_sort_tiny.py policy.path=runs/sft_sort_tiny/export
    rlhf-jax online_dpo --config experiments/online_dpo_sort_tiny.py online_dpo.beta=0.3 online_dpo.loss_type=ipo
    rlhf-jax online_dpo --config experiments/online_dpo_sort_tiny.py reward.kind=model reward.path=runs/rm/export
"""
from pathlib import Path

from rlhf_jax.config import load_config_file
from rlhf_jax.rl import OnlineDPOConfig, OnlineDPOHParams, OnlineDPOTrainConfig


def get_config() -> OnlineDPOTrainConfig:
    base = load_config_file(Path(__file__).with_name("grpo_sort_tiny.py"))  # everything else as there
    fields = {k: getattr(base, k) for k in ("task", "policy", "reward", "data", "optim", "checkpoint", "log",
                                            "iterations", "sample_every")}
    return OnlineDPOTrainConfig(
        **fields,
        online_dpo=OnlineDPOConfig(batch_size=16, max_new_tokens=base.grpo.max_new_tokens,
                                   hparams=OnlineDPOHParams(beta=0.1, lr=base.grpo.lr)),
        out_dir="runs/online_dpo_sort_tiny",
    )
