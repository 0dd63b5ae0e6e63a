"""The rollout half of the RL core: sampling, the policy/reference/value forwards, scoring.

Layout of one rollout (``B`` rows, prompt length ``P``, response length ``N``)::

    prompt_ids [B, P]  left-padded (prompt_mask 1 on real tokens)
    response_ids [B, N] right-padded after the first stop token (response_mask 1 up to and
                        including it)
    sequence = concat(prompt, response) [B, P + N], attention mask = concat of the two masks

The logits at sequence position ``P - 1 + t`` predict response token ``t``; the value of the
state before response token ``t`` is read at the same position. All three log-prob sets
(``old_logp``, ``ref_logp`` and the ``logp`` of the update) come from ``losses.sequence_logprobs``
on logits divided by the same sampling temperature τ (docs/MATH.md, PPO section), computed by the same
forward function on the same minibatch shape, so the first update's ratio is exactly 1.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax import losses
from rlhf_jax.generation import generate
from rlhf_jax.models import lora
from rlhf_jax.models import CausalLM, CausalLMWithValueHead, last_token_values, split_value_head

Array = jax.Array
RewardFn = Callable[[Array, Array, Array, Array], Array]


@struct.dataclass
class Rollout:
    """Everything the update needs from one rollout; leading axis = rollout rows ``B``.

    ``old_logp``/``ref_logp`` are ``[B, N]`` temperature-scaled per-token log-probs (0 off the
    mask); ``old_values`` ``[B, N]`` the value model's V(s_t) (zeros for critic-free methods);
    ``entropy`` ``[B, N]`` per-token entropy of the sampling distribution (0 off the mask).
    """
    prompt_ids: Array
    prompt_mask: Array
    response_ids: Array
    response_mask: Array
    old_logp: Array
    ref_logp: Array
    old_values: Array
    entropy: Array

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]


def concat_sequences(prompt_ids: Array, prompt_mask: Array, response_ids: Array,
                     response_mask: Array) -> tuple[Array, Array]:
    """``(ids [B, P+N] int32, mask [B, P+N] int32)`` of prompt followed by response."""
    ids = jnp.concatenate([prompt_ids.astype(jnp.int32), response_ids.astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    return ids, mask


def response_slice(x_BT: Array, prompt_len: int) -> Array:
    """Positions ``P-1 .. P+N-2`` of a sequence-shaped array: the ones that predict the response."""
    return x_BT[:, prompt_len - 1:-1]


def split_outputs(out: Any) -> tuple[Array, Array | None]:
    """``CausalLM`` returns logits; ``CausalLMWithValueHead`` returns ``(logits, values)``."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def policy_forward(model, params, prompt_ids: Array, prompt_mask: Array, response_ids: Array,
                   response_mask: Array, temperature: Array, *, with_entropy: bool = True
                   ) -> dict[str, Array]:
    """One forward pass of the policy over prompt+response.

    Returns a dict with ``logp [B, N]`` (``log softmax(z/τ)[token]``, 0 off the mask),
    ``logits [B, N, V]`` (already divided by τ), ``entropy [B, N]`` (of softmax(z/τ), 0 off the
    mask) when ``with_entropy``, and ``values [B, N]`` when the model has a value head.
    """
    ids, mask = concat_sequences(prompt_ids, prompt_mask, response_ids, response_mask)
    prompt_len = prompt_ids.shape[1]
    cls = type(model)
    if hasattr(cls, "hidden_states") and (hasattr(cls, "logits_from_hidden") or hasattr(cls, "heads_from_hidden")):
        # the LM head only on the N positions that predict the response (not on the prompt)
        h = response_slice(model.apply(params, ids, attention_mask=mask, method=cls.hidden_states), prompt_len)
        head = cls.logits_from_hidden if hasattr(cls, "logits_from_hidden") else cls.heads_from_hidden
        chunk = int(getattr(model.config, "logits_chunk", 0) or 0)
        if 0 < chunk < response_ids.shape[1]:
            return _chunked_head(model, params, head, h, response_ids, response_mask, temperature, chunk,
                                 with_entropy)
        logits_r, values_r = split_outputs(model.apply(params, h, method=head))
    else:
        logits, values = split_outputs(model.apply(params, ids, attention_mask=mask))
        logits_r = response_slice(logits, prompt_len)
        values_r = None if values is None else response_slice(values, prompt_len)
    logits_r = logits_r.astype(jnp.float32)
    logp = losses.sequence_logprobs(logits_r, response_ids, response_mask, temperature=temperature)
    out = {"logp": logp}
    if with_entropy:
        out["entropy"] = losses.entropy_from_logits(logits_r / temperature, response_mask, reduction="none")
    if values_r is not None:
        out["values"] = values_r.astype(jnp.float32) * response_mask
    return out


def _chunked_head(model, params, head, h: Array, response_ids: Array, response_mask: Array, temperature: Array,
                  chunk: int, with_entropy: bool) -> dict[str, Array]:
    """:func:`policy_forward`'s head on ``chunk`` response tokens at a time (``ModelConfig.logits_chunk``): each
    chunk's ``[B, c, V]`` logits live only inside a rematerialised ``lax.map`` step, so neither pass holds
    ``[B, N, V]`` whole. Same numbers as the unchunked head (tested)."""
    b, n = response_ids.shape
    if n % chunk:
        raise ValueError(f"ModelConfig.logits_chunk={chunk} does not divide the {n} response tokens")
    k = n // chunk

    @jax.checkpoint
    def one(xs):
        h_c, ids_c, mask_c = xs
        logits, values = split_outputs(model.apply(params, h_c, method=head))
        logits = logits.astype(jnp.float32)
        res = {"logp": losses.sequence_logprobs(logits, ids_c, mask_c, temperature=temperature)}
        if with_entropy:
            res["entropy"] = losses.entropy_from_logits(logits / temperature, mask_c, reduction="none")
        if values is not None:
            res["values"] = values.astype(jnp.float32) * mask_c
        return res

    split = lambda x: jnp.swapaxes(x.reshape((b, k, chunk) + x.shape[2:]), 0, 1)  # noqa: E731  [k, B, c, ...]
    out = jax.lax.map(one, (split(h), split(response_ids), split(response_mask)))
    return {key: jnp.swapaxes(v, 0, 1).reshape(b, n) for key, v in out.items()}


def _token_values(model, params, ids: Array, mask: Array) -> Array:
    """``[B, T]`` scalar head of a ``ScalarHeadModel`` (or the value head of a ``CausalLMWithValueHead``)."""
    values = model.apply(params, ids, attention_mask=mask)
    return values[1] if isinstance(values, tuple) else values


def value_forward(model, params, prompt_ids: Array, prompt_mask: Array, response_ids: Array,
                  response_mask: Array) -> Array:
    """``[B, N]`` V(s_t) of a separate value model (``ScalarHeadModel``), 0 off the mask."""
    ids, mask = concat_sequences(prompt_ids, prompt_mask, response_ids, response_mask)
    values = _token_values(model, params, ids, mask)
    return response_slice(values, prompt_ids.shape[1]).astype(jnp.float32) * response_mask


def reward_model_scores(model, params, prompt_ids: Array, prompt_mask: Array, response_ids: Array,
                        response_mask: Array) -> Array:
    """``[B]`` reward-model score at the last real token of prompt+response."""
    ids, mask = concat_sequences(prompt_ids, prompt_mask, response_ids, response_mask)
    return last_token_values(_token_values(model, params, ids, mask), mask).astype(jnp.float32)


def chunked(fn: Callable[..., Any], chunk: int, *arrays: Array) -> Any:
    """``fn(*arrays)`` evaluated on consecutive row chunks of size ``chunk`` with ``lax.map``.

    The rollout's reference/value/reward passes and the old log-probs run at the minibatch
    shape, which bounds activation memory and makes them bit-identical to the update's first
    forward pass. Rows must be divisible by ``chunk``.
    """
    rows = arrays[0].shape[0]
    if rows % chunk:
        raise ValueError(f"chunked: {rows} rows are not divisible by the chunk size {chunk}")
    if rows == chunk:
        return fn(*arrays)
    n = rows // chunk
    split = [a.reshape((n, chunk) + a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(split))
    return jax.tree_util.tree_map(lambda x: x.reshape((rows,) + x.shape[2:]), out)


def has_stop_token(response_ids: Array, response_mask: Array, stop_token_ids: Sequence[int]) -> Array:
    """``[B]`` bool: the response contains one of ``stop_token_ids`` on a real position."""
    if not stop_token_ids:
        return jnp.zeros(response_ids.shape[:1], bool)
    is_stop = jnp.isin(response_ids, jnp.asarray(stop_token_ids, response_ids.dtype))
    return jnp.any(is_stop & (response_mask > 0), axis=1)


def adjust_scores(scores: Array, stopped: Array, *, missing_eos_penalty: Array, score_clip: Array,
                  stop_token_ids: Sequence[int]) -> Array:
    """Missing-EOS penalty then clipping to ±score_clip (docs/MATH.md, PPO section), ``[B]`` float32.

    ``score - missing_eos_penalty`` where no stop token was emitted (only when stop tokens are
    configured at all), then ``clip(score, -score_clip, score_clip)`` (``inf`` = no clipping).
    """
    scores = jnp.asarray(scores, jnp.float32)
    if stop_token_ids:
        scores = losses.apply_missing_eos_penalty(scores, stopped, missing_eos_penalty)
    return jnp.clip(scores, -score_clip, score_clip)


def repeat_prompts(prompts: dict[str, Array], group_size: int) -> dict[str, Array]:
    """Each prompt repeated ``group_size`` times, a prompt's copies contiguous (GRPO/RLOO)."""
    return {k: jnp.repeat(v, group_size, axis=0) for k, v in prompts.items()}


def check_prompts(prompts: dict[str, Array], batch_size: int, where: str) -> tuple[Array, Array]:
    """The ``prompt_ids``/``prompt_mask`` of a prompt batch, checked against the config."""
    for key in ("prompt_ids", "prompt_mask"):
        if key not in prompts:
            raise KeyError(f"{where}: the prompt batch has no {key!r} (keys: {sorted(prompts)})")
    ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"{where}: prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [B, P]")
    if ids.shape[0] != batch_size:
        raise ValueError(f"{where}: the prompt batch has {ids.shape[0]} rows but batch_size is {batch_size}")
    return ids, mask


def lm_view(model, params) -> tuple[Any, Any]:
    """``(CausalLM, its params)`` of a policy: itself, or the LM part of a ``CausalLMWithValueHead``."""
    if isinstance(model, lora.LoraModel):  # generation/export: the adapters merged into a plain module
        model, params = lora.merged(model, params) if params is not None else (model.model, None)
    if isinstance(model, CausalLMWithValueHead):
        return CausalLM(model.config), (None if params is None else split_value_head(params)[0])
    return model, params


def sample(policy_model, policy_params, prompt_ids: Array, prompt_mask: Array, rng: Array, *, cfg) -> Any:
    """``generation.generate`` with the policy at the config's sampling settings (``GenerationOutput``)."""
    model, params = lm_view(policy_model, policy_params)
    hp = cfg.hparams
    return generate(model, params, prompt_ids, prompt_mask, rng=rng, max_new_tokens=cfg.max_new_tokens,
                    temperature=hp.temperature, top_k=cfg.top_k, top_p=hp.top_p,
                    stop_token_ids=tuple(cfg.stop_token_ids), pad_token_id=cfg.pad_token_id)


def rollout_forwards(policy_params, value_params, frozen, prompt_ids: Array, prompt_mask: Array,
                     response_ids: Array, response_mask: Array, *, chunk: int, temperature: Array,
                     value_mode: str | None, with_ref: bool = True) -> Rollout:
    """The policy/reference/value forward passes of a rollout, in chunks of ``chunk`` rows.

    ``value_mode``: "separate" (value model), "shared" (the policy's value head) or None (zeros).
    ``with_ref=False`` skips the reference pass (``ref_logp`` is then a copy of ``old_logp``).
    """
    model = frozen.policy_model
    ref_model, _ = lm_view(model, None)
    sg = jax.lax.stop_gradient
    ref_params = frozen.ref_params
    if ref_params is None and lora.is_lora_params(policy_params):  # LoRA: the policy's own base, adapters off
        ref_params = lm_view(lora.base_model(model), lora.base_params(policy_params))[1]

    def pol(p_ids, p_mask, r_ids, r_mask):
        out = policy_forward(model, sg(policy_params), p_ids, p_mask, r_ids, r_mask, temperature)
        if with_ref:
            ref_logp = policy_forward(ref_model, sg(ref_params), p_ids, p_mask, r_ids, r_mask,
                                      temperature, with_entropy=False)["logp"]
        else:
            ref_logp = out["logp"]
        res = {"logp": out["logp"], "entropy": out["entropy"], "ref_logp": ref_logp}
        if value_mode == "shared":
            res["values"] = out["values"]
        elif value_mode == "separate":
            res["values"] = value_forward(frozen.value_model, sg(value_params), p_ids, p_mask, r_ids, r_mask)
        else:
            res["values"] = jnp.zeros(r_ids.shape, jnp.float32)
        return res

    out = chunked(pol, chunk, prompt_ids, prompt_mask, response_ids, response_mask)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, old_logp=out["logp"], ref_logp=out["ref_logp"],
                   old_values=out["values"], entropy=out["entropy"])


def score_rollout(frozen, rollout: Rollout, *, chunk: int, cfg=None) -> Array:
    """``[B]`` raw scores from the reward model (last real token, plus its shift) or the JAX reward function."""
    return score_tokens(frozen, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                        rollout.response_mask, chunk=chunk, cfg=cfg)


def score_tokens(frozen, prompt_ids: Array, prompt_mask: Array, response_ids: Array, response_mask: Array, *,
                 chunk: int, cfg=None) -> Array:
    """:func:`score_rollout` of token rows that have no forwards yet (DAPO's dynamic sampling scores every
    round's samples before it decides which to keep)."""
    args = (prompt_ids, prompt_mask, response_ids, response_mask)
    if frozen.reward_fn is not None:
        scores = frozen.reward_fn(*args)
    elif frozen.reward_model is not None and getattr(frozen, "reward_ensemble", 0):
        scores = ensemble_scores(frozen, *args, chunk=chunk, cfg=cfg)
    elif frozen.reward_model is not None:
        scores = chunked(lambda *a: reward_model_scores(frozen.reward_model, frozen.reward_params, *a),
                         chunk, *args) + jnp.asarray(frozen.reward_shift, jnp.float32)
    else:
        raise ValueError("RLFrozen has neither reward_fn nor reward_model: a Python reward must go through "
                         "rollout -> host scores -> update")
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != response_ids.shape[:1]:
        raise ValueError(f"reward source returned scores of shape {scores.shape}; expected "
                         f"({response_ids.shape[0]},)")
    return jax.lax.stop_gradient(scores)


def ensemble_member_scores(frozen, prompt_ids: Array, prompt_mask: Array, response_ids: Array,
                           response_mask: Array, *, chunk: int) -> Array:
    """``[K, B]`` scores of each member of a reward-model ensemble (``frozen.reward_params`` stacked on a
    leading ``K`` axis, ``frozen.reward_shift [K]`` each member's centring shift), one vmapped program."""
    def member(params, shift):
        return chunked(lambda *a: reward_model_scores(frozen.reward_model, params, *a), chunk,
                       prompt_ids, prompt_mask, response_ids, response_mask) + shift
    shift = jnp.broadcast_to(jnp.asarray(frozen.reward_shift, jnp.float32), (frozen.reward_ensemble,))
    return jax.vmap(member)(frozen.reward_params, shift)


def ensemble_scores(frozen, prompt_ids: Array, prompt_mask: Array, response_ids: Array, response_mask: Array, *,
                    chunk: int, cfg=None) -> Array:
    """``[B]`` ensemble reward: the members' centred scores aggregated by the algorithm's
    ``reward_aggregation`` (mean|wco|uwo; mean without one) with its traced ``uwo_lambda``."""
    member = ensemble_member_scores(frozen, prompt_ids, prompt_mask, response_ids, response_mask, chunk=chunk)
    how = getattr(cfg, "reward_aggregation", "mean")
    lam = getattr(cfg.hparams, "uwo_lambda", 0.0) if cfg is not None else 0.0
    return losses.aggregate_ensemble(member, how, lam)
