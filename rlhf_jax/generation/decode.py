"""The decode loop: prefill once, then one-token steps inside ``lax.while_loop``.

The loop is model-agnostic: it drives a ``step_fn(carry, tokens [B]) -> (logits [B, V], carry)``
(the model with its KV cache, in ``generate``; a crafted function in tests). Output
shapes are fixed (``[B, N]``), so one call is one compiled program; the loop exits
early once every row has emitted a stop token.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.generation.sampling import sample_tokens
from rlhf_jax.generation.stopping import is_stop_token

Array = jax.Array


@flax.struct.dataclass
class GenerationOutput:
    """What a rollout returns. ``B`` rows, ``N = max_new_tokens`` columns.

    Attributes:
      tokens: ``[B, N]`` int32 sampled tokens; ``pad_token_id`` after a row's first stop token.
      logprobs: ``[B, N]`` float32, ``log_softmax(logits / T)[token]`` on real tokens, 0 on pad.
      mask: ``[B, N]`` int32, 1 up to and including the first stop token, 0 after it.
      stopped: ``[B]`` bool, whether the row emitted a stop token within ``N`` tokens.
    """

    tokens: Array
    logprobs: Array
    mask: Array
    stopped: Array

    @property
    def lengths(self) -> Array:
        """``[B]`` int32 number of real response tokens (stop token included)."""
        return jnp.sum(self.mask, axis=-1)


StepFn = Callable[[Any, Array], "tuple[Array, Any]"]


def decode_loop(
    step_fn: StepFn,
    carry: Any,
    first_logits: Array,
    *,
    rng: Array,
    max_new_tokens: int,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    segment_ends: Sequence[int] = (),
    grow: Callable[[Any, int], Any] | None = None,
) -> tuple[GenerationOutput, Any]:
    """Samples ``max_new_tokens`` tokens per row.

    Token ``t`` is chosen from the logits that follow token ``t-1`` (token 0 from
    ``first_logits``, i.e. the prefill's last position) with key
    ``fold_in(rng, t)``, so a run is a pure function of ``rng``. A row that has
    emitted a stop token keeps being fed ``pad_token_id`` (its outputs are discarded)
    while the others continue; the loop stops when all rows are done or after
    ``N - 1`` model steps (the last token is never fed back).

    Args:
      step_fn: ``(carry, tokens [B] int32) -> (logits [B, V], carry)``.
      carry: initial state of ``step_fn`` (e.g. KV cache and positions).
      first_logits: ``[B, V]`` logits for the first new token.
      rng: PRNG key. Ignored when ``greedy``.
      max_new_tokens: static ``N >= 1``.
      temperature, top_k, top_p: traced scalars (see ``sampling.sample_tokens``).
      greedy: static; argmax instead of sampling.
      stop_token_ids: static tuple of ints.
      pad_token_id: static int written after a row stops.
      segment_ends: static increasing step counts ``< N`` that split the loop into consecutive
        ``while_loop`` segments; before the segment that runs steps ``[e_i, e_{i+1})`` the carry
        becomes ``grow(carry, e_{i+1})``. ``generate`` uses this to grow the KV cache with the
        sequence, so attention in early steps reads a short cache instead of the full allocation.
      grow: ``(carry, end) -> carry`` able to run every step ``t < end``; required with ``segment_ends``.

    Returns:
      ``(GenerationOutput, final carry)``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a static int >= 1, got {max_new_tokens!r}")
    batch = first_logits.shape[0]
    n = max_new_tokens
    stop_ids = tuple(stop_token_ids)
    pad = jnp.int32(pad_token_id)

    def choose(t, logits, done):
        key = jax.random.fold_in(rng, t)
        tok, lp = sample_tokens(key, logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        live = jnp.logical_not(done)
        tok = jnp.where(live, tok, pad)
        lp = jnp.where(live, lp, 0.0)
        new_done = done | (live & is_stop_token(tok, stop_ids))
        return tok, lp, live.astype(jnp.int32), new_done

    tok0, lp0, live0, done0 = choose(0, first_logits, jnp.zeros((batch,), bool))
    tokens = jnp.full((batch, n), pad, jnp.int32).at[:, 0].set(tok0)
    logprobs = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(lp0)
    mask = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(live0)

    def cond(state):
        t, _, _, _, done, _, _ = state
        return (t < n) & jnp.logical_not(jnp.all(done))

    def body(state):
        t, tokens, logprobs, mask, done, carry, last = state
        logits, carry = step_fn(carry, last)
        tok, lp, live, done = choose(t, logits, done)
        col = (jnp.int32(0), t)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], col)
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], col)
        mask = jax.lax.dynamic_update_slice(mask, live[:, None], col)
        return t + 1, tokens, logprobs, mask, done, carry, tok

    ends = [int(e) for e in segment_ends]
    if ends and (grow is None or any(b <= a for a, b in zip([1] + ends, ends + [n])) or ends[-1] >= n):
        raise ValueError(f"segment_ends must be increasing step counts in (1, {n}) and need grow=; got {ends}")

    def run_until(end, state):
        def seg_cond(st):
            return (st[0] < end) & cond(st)

        return jax.lax.while_loop(seg_cond, body, state)

    state = (jnp.int32(1), tokens, logprobs, mask, done0, carry, tok0)
    if n > 1:
        for i, end in enumerate(ends + [n]):
            if i > 0:
                state = state[:5] + (grow(state[5], end),) + state[6:]
            state = run_until(end, state)
    _, tokens, logprobs, mask, done, carry, _ = state
    return GenerationOutput(tokens=tokens, logprobs=logprobs, mask=mask, stopped=done), carry
