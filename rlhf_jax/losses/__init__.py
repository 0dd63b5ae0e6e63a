"""rlhf_jax.losses: every RLHF objective as a pure, jit/vmap/grad-able function of arrays.

See docs/DESIGN.md ("Losses") for conventions: masks, reductions ("(sum, count), divide once"),
traced hyper-parameters.
"""

from rlhf_jax.losses.advantages import gae_advantages, grpo_advantages, reinforce_pp_advantages, rloo_advantages
from rlhf_jax.losses.common import (explained_variance, masked_mean, masked_sum, masked_var, masked_whiten,
                                    reduce_loss, reduction_terms)
from rlhf_jax.losses.dpo import dpo_loss
from rlhf_jax.losses.ensemble import AGGREGATIONS, aggregate_ensemble
from rlhf_jax.losses.grpo import grpo_policy_loss
from rlhf_jax.losses.kl import (AdaptiveKLController, apply_missing_eos_penalty, kl_estimate, kl_penalized_rewards,
                                last_token_index, update, update_kl_controller)
from rlhf_jax.losses.policy import cispo_policy_loss, gspo_policy_loss
from rlhf_jax.losses.ppo import entropy_from_logits, ppo_policy_loss, ppo_value_loss
from rlhf_jax.losses.preference import kto_loss, orpo_loss, simpo_loss
from rlhf_jax.losses.reward import bradley_terry_loss, ranking_loss
from rlhf_jax.losses.sft import chunked_token_logprobs, sequence_logprobs, sft_loss, sft_loss_chunked

__all__ = [
    "AGGREGATIONS",
    "aggregate_ensemble",
    "AdaptiveKLController",
    "apply_missing_eos_penalty",
    "bradley_terry_loss",
    "chunked_token_logprobs",
    "cispo_policy_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "grpo_advantages",
    "grpo_policy_loss",
    "gspo_policy_loss",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_loss",
    "reduce_loss",
    "reduction_terms",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "sft_loss_chunked",
    "simpo_loss",
    "update",
    "update_kl_controller",
]
