"""The framework's trainers by name: the one table the command line (``rlhf-jax <name>``) and the sweeps
share. Entries name their config class and train function by import path, so reading the table imports
nothing heavy."""
from __future__ import annotations

import importlib
from typing import Any

# trainer subcommand -> ("module:ConfigClass", "module:train_function", summary metrics, one-line help)
TRAINERS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "sft": ("rlhf_jax.training.sft:SFTConfig", "rlhf_jax.training.sft:train_sft", ("loss", "eval/loss"),
            "supervised fine-tuning (token cross-entropy on responses)"),
    "reward": ("rlhf_jax.training.reward:RewardConfig", "rlhf_jax.training.reward:train_reward",
               ("loss", "eval/accuracy", "eval/margin", "reward_shift"),
               "train a Bradley-Terry reward model on preferences/rankings"),
    "ppo": ("rlhf_jax.rl.trainer:PPOTrainConfig", "rlhf_jax.rl.trainer:train_ppo", ("score", "kl", "loss"),
            "PPO with a KL penalty against a reward model or function"),
    "grpo": ("rlhf_jax.rl.trainer:GRPOTrainConfig", "rlhf_jax.rl.trainer:train_grpo", ("score", "kl", "loss"),
             "GRPO: group-relative policy optimisation"),
    "rloo": ("rlhf_jax.rl.trainer:RLOOTrainConfig", "rlhf_jax.rl.trainer:train_rloo", ("score", "kl", "loss"),
             "RLOO: REINFORCE with a leave-one-out baseline"),
    "online_dpo": ("rlhf_jax.rl.trainer:OnlineDPOTrainConfig", "rlhf_jax.rl.trainer:train_online_dpo",
                   ("score", "kl", "loss"), "online DPO: pairs sampled from the policy, judged by the reward"),
    "dpo": ("rlhf_jax.rl.dpo:DPOTrainConfig", "rlhf_jax.rl.dpo:train_dpo", ("loss", "reward_margin"),
            "direct preference optimisation (sigmoid/hinge/IPO/robust)"),
    "rsft": ("rlhf_jax.rl.rsft:RSFTTrainConfig", "rlhf_jax.rl.rsft:train_rsft", ("score", "kl", "loss"),
             "rejection-sampling fine-tuning: SFT on the policy's own best-of-n samples, iterated"),
}

# trainer subcommand -> "module:function" that checks its config without building anything (what
# ``--print-config`` runs before printing)
VALIDATORS: dict[str, str] = {
    "sft": "rlhf_jax.training.sft:validate_sft_config",
    "reward": "rlhf_jax.training.reward:validate_reward_config",
    "ppo": "rlhf_jax.rl.trainer:validate_rl_config",
    "grpo": "rlhf_jax.rl.trainer:validate_rl_config",
    "rloo": "rlhf_jax.rl.trainer:validate_rl_config",
    "online_dpo": "rlhf_jax.rl.trainer:validate_rl_config",
    "dpo": "rlhf_jax.rl.dpo:validate_dpo_config",
    "rsft": "rlhf_jax.rl.rsft:validate_rsft_config",
}


def load(target: str) -> Any:
    """The object named by ``"package.module:name"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)

