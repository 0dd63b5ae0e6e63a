"""Scalar heads on the shared trunk: reward models, value models, policy + value.

Parameter trees (the trunk is always `model/...`, as in `CausalLM`):

    ScalarHeadModel:        model/..., score/kernel [D, 1]            (no bias: HF `score.weight`)
    CausalLMWithValueHead:  model/..., lm_head/kernel [D, V] (untied), value_head/{kernel [D, 1], bias [1]}

A fresh head is initialised `N(0, 1/(D+1))` (Stiennon et al. 2020 / InstructGPT reward heads),
so initial rewards are O(1) whatever the trunk width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.architecture import ModelConfig
from rlhf_jax.models.transformer import LMHead, Transformer

Array = jax.Array


def head_init(hidden_size: int):
    """Initializer of a fresh scalar head: normal with std `1/sqrt(hidden_size + 1)`."""
    return nn.initializers.normal(stddev=(hidden_size + 1) ** -0.5)


class ScalarHeadModel(nn.Module):
    """Trunk + linear head to one scalar per token (reward or value model).

    `model.apply(params, input_ids, attention_mask=None, *, positions=None, segment_ids=None)`
    -> values `[B, T]` float32 (`v[b,t] = w · h[b,t]`, h the final-normed hidden state).
    A sequence's reward is `last_token_values(values, attention_mask)`.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.model = Transformer(c)
        # heads compute in float32: a reward/value is one dot product, precision is free here
        self.score = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=c.param_dtype,
                              kernel_init=head_init(c.hidden_size))

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        return self.model(input_ids, attention_mask, positions, segment_ids, None)[0]

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        h, _ = self.model(input_ids, attention_mask, positions, segment_ids, None)
        return self.score(h)[..., 0].astype(jnp.float32)


class CausalLMWithValueHead(nn.Module):
    """Policy and value sharing one trunk: `apply(...) -> (logits [B,T,V] f32, values [B,T] f32)`.

    Its params minus `value_head` are exactly `CausalLM` params (`split_value_head`), so the policy
    part can be handed to `generation.generate` with a plain `CausalLM(config)`.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.model = Transformer(c)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c)
        self.value_head = nn.Dense(1, use_bias=True, dtype=jnp.float32, param_dtype=c.param_dtype,
                                   kernel_init=head_init(c.hidden_size))

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        """Final-normed hidden states `[B, T, D]` (feed a slice of them to `heads_from_hidden`)."""
        return self.model(input_ids, attention_mask, positions, segment_ids, None)[0]

    def heads_from_hidden(self, h):
        """`(logits [..., V] f32, values [...] f32)` of final-normed hidden states."""
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        values = self.value_head(h)[..., 0]
        return logits.astype(jnp.float32), values.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None):
        h, _ = self.model(input_ids, attention_mask, positions, segment_ids, None)
        return self.heads_from_hidden(h)


def split_value_head(params: dict) -> tuple[dict, dict]:
    """`CausalLMWithValueHead` params -> (`CausalLM` params, `{"params": {"value_head": ...}}`)."""
    inner = params["params"]
    if "value_head" not in inner:
        raise KeyError(f"split_value_head: no 'value_head' in params (keys: {sorted(inner)})")
    lm = {k: v for k, v in inner.items() if k != "value_head"}
    return {"params": lm}, {"params": {"value_head": inner["value_head"]}}


def last_token_values(values_BT: Array, mask_BT: Array) -> Array:
    """`values[b, t*_b]` `[B]` with `t*_b` the last position where `mask[b] == 1` (left or right padding).

    A row with no real token gets 0.
    """
    if values_BT.ndim != 2 or values_BT.shape != mask_BT.shape:
        raise ValueError(f"last_token_values: expected values and mask of one shape [B, T], got "
                         f"{list(values_BT.shape)} and {list(mask_BT.shape)}")
    t = values_BT.shape[-1]
    idx = jnp.max(jnp.where(mask_BT.astype(bool), jnp.arange(t), -1), axis=-1)
    picked = jnp.take_along_axis(values_BT, jnp.maximum(idx, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(idx >= 0, picked, jnp.zeros_like(picked))
