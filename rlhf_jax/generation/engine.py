"""``generate``: prefill + KV-cache decode of a ``CausalLM``, one compiled program per shape bucket.

Flow for prompts ``[B, P]`` (left-padded, ``prompt_mask`` 1 on real tokens):

1. widen the prompts on the left to the bucket ``P' >= P`` (``bucketing``), so a stream of
   prompt lengths compiles a bounded number of times;
2. allocate a cache of ``P' + N - 1`` slots (``models.init_cache``) and run the whole prompt
   through the trunk once (prefill); only the last position goes through the LM head;
3. ``decode_loop``: ``N - 1`` one-token steps inside ``lax.while_loop``, each writing its key
   and value in place (``dynamic_update_slice`` on the loop-carried cache), with positions
   ``len_b + t`` continuing each row's count (``len_b`` = real prompt tokens of row b);
   early exit once every row has stopped.

``generate`` pads to the bucket on the caller's side, then calls a ``jax.jit`` program with
``model``, ``max_new_tokens``, ``greedy``, ``stop_token_ids`` and ``pad_token_id`` static; ``temperature``,
``top_k`` and ``top_p`` are traced, so changing them never recompiles. Called inside an outer
``jax.jit`` (the PPO iteration) it is simply inlined. Sharding follows the inputs: with
``prompt_ids`` sharded over a ``data`` mesh axis and params as the training state leaves
them, every op in the loop is batch-parallel.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax.generation.bucketing import bucket_length, left_pad_to
from rlhf_jax.generation.decode import GenerationOutput, decode_loop
from rlhf_jax.generation.errors import GenerationArgumentError
from rlhf_jax.generation.stopping import normalize_stop_ids
from rlhf_jax.models import CausalLM, grow_cache, init_cache  # generation sits above models
from rlhf_jax.models.transformer import linear

Array = jax.Array


def _concrete(x) -> np.ndarray | None:
    """``x`` as a host numpy array when its value is known here, else None (a tracer inside an outer
    ``jax.jit``, or an array other hosts hold parts of)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _scalar(name: str, value) -> float | None:
    """A concrete scalar argument as a float (None when traced); a non-scalar is refused."""
    v = _concrete(value)
    if v is None:
        return None
    if v.ndim != 0 or not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
        raise GenerationArgumentError(f"generate: {name} must be a number, got {value!r}")
    return float(v)


def check_arguments(model, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_k, top_p, greedy,
                    pad_token_id) -> None:
    """Refuses arguments ``generate`` cannot honour before anything is compiled.

    Shapes and static arguments are always checked; the values of ``temperature``/``top_k``/``top_p``
    and of the prompts only when they are concrete (not tracers of an outer ``jax.jit``)."""
    if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
        raise GenerationArgumentError(
            f"generate: prompt_ids and prompt_mask must both be [B, P]; got {list(prompt_ids.shape)} and "
            f"{list(prompt_mask.shape)}"
        )
    if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise GenerationArgumentError(f"generate: prompt_ids must be integer token ids, got dtype {prompt_ids.dtype}")
    if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
        raise GenerationArgumentError(f"generate: prompt_ids is empty (shape {list(prompt_ids.shape)}); need "
                                      "B >= 1 prompts of P >= 1 tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationArgumentError(f"generate: max_new_tokens must be a Python int >= 1, got {max_new_tokens!r}")
    cfg = model.config
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < cfg.vocab_size:
        raise GenerationArgumentError(f"generate: pad_token_id must be a Python int in [0, vocab_size="
                                      f"{cfg.vocab_size}), got {pad_token_id!r}")
    t = _scalar("temperature", temperature)
    if t is not None and not (np.isfinite(t) and t > 0):
        raise GenerationArgumentError(
            f"generate: temperature must be a finite number > 0 (it divides the logits, also for the log-probs "
            f"of greedy decoding), got {temperature!r}" + ("" if greedy else "; for argmax decoding pass greedy=True"))
    k = _scalar("top_k", top_k)
    if k is not None and not (k >= 0 and k == int(k)):
        raise GenerationArgumentError(f"generate: top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    p = _scalar("top_p", top_p)
    if p is not None and not 0 < p <= 1:
        raise GenerationArgumentError(f"generate: top_p must be in (0, 1] (1 disables it), got {top_p!r}")
    mask = _concrete(prompt_mask)
    if mask is None:
        return
    lengths = (mask != 0).sum(axis=1)
    if (lengths == 0).any():
        row = int(np.argmin(lengths))
        raise GenerationArgumentError(f"generate: prompt_mask row {row} has no real token; every prompt needs "
                                      "at least one (1 in prompt_mask)")
    longest = int(lengths.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise GenerationArgumentError(
            f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
            f"exceeds the model's max_position_embeddings {cfg.max_position_embeddings}; shorten the prompt or "
            "lower max_new_tokens")
    ids = _concrete(prompt_ids)
    bad = (mask != 0) & ((ids < 0) | (ids >= cfg.vocab_size))
    if bad.any():
        b, t_ = (int(i) for i in np.argwhere(bad)[0])
        raise GenerationArgumentError(
            f"generate: prompt_ids[{b}, {t_}] = {int(ids[b, t_])} is not a token id of the model (vocab_size "
            f"{cfg.vocab_size}): do the tokenizer and the model match?")


def _check_model(model) -> None:
    for attr in ("config", "hidden_states", "logits_from_hidden"):
        if not hasattr(model, attr):
            raise TypeError(
                f"generate: model must be an rlhf_jax.models.CausalLM (with .{attr}); got {type(model).__name__}. "
                "For CausalLMWithValueHead params, use models.split_value_head and a CausalLM(config)."
            )


# Decode steps per cache segment: the loop is split so the cache grows with the sequence (steps
# [0, 64) read at most prompt + 63 slots, not prompt + N - 1). Each segment is its own copy of the
# step in the compiled program, so short generations (N <= 64) stay one loop.
SEGMENT_STEPS = 64

# XLA:CPU compiles small-M matmuls (M = batch in decode) to YNNPACK fusions that repack the weight
# matrix on every call (measured ~0.7 ms vs ~0.15 ms with the default dot emitter for a 16x256 @
# 256x1024 decode matmul, benchmarks/README.md); these DebugOptions fields are ignored by the GPU
# and TPU compilers.
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_xnnpack": False}
DECODE_COMPILER_OPTIONS = {"cpu": CPU_DECODE_COMPILER_OPTIONS}  # by backend


def decode_compiler_options() -> dict | None:
    """The compiler options ``generate`` uses on the platform programs are built for now
    (``rlhf_jax.devices.platform()``; ``None``: XLA's defaults)."""
    return DECODE_COMPILER_OPTIONS.get(devices_lib.platform())


# Tied embeddings on CPU: the decode step's LM head reads a row-major [D, V] copy of the embedding,
# made once per call outside the loop. `h @ embedding.T` contracts the embedding's minor axis, which
# XLA:CPU's dot runs at ~3 GB/s at batch 16; on the [D, V] copy it runs at ~5 GB/s (GPT-2 124M,
# batch 16: 146 -> 107 ms per decode step, benchmarks/README.md "Profiles"). Accelerators keep the
# plain tied head (no second copy of the embedding in memory).
def _decode_output_kernel(model, params) -> Array | None:
    """The ``[D, V]`` output kernel to use in the decode loop, or ``None`` for ``logits_from_hidden``."""
    cls = type(model)
    if (devices_lib.platform() != "cpu" or not isinstance(model, CausalLM)
            or cls.logits_from_hidden is not CausalLM.logits_from_hidden or not model.config.tie_word_embeddings):
        return None
    return model.apply(params, method=cls.output_kernel)


def segment_ends(max_new_tokens: int, segment_steps: int | None = None) -> tuple[int, ...]:
    """Loop-step boundaries of the cache segments (see ``decode_loop(segment_ends=...)``)."""
    step = SEGMENT_STEPS if segment_steps is None else int(segment_steps)
    if step < 1:
        raise ValueError(f"segment_steps must be >= 1, got {step}")
    return tuple(range(step, max_new_tokens, step))


def decode_program(model, params, ids, mask, rng, temperature, top_k, top_p, *, max_new_tokens, greedy,
                   stop_token_ids, pad_token_id) -> GenerationOutput:
    """The traced body of ``generate`` on already bucketed inputs (inline it in a larger jit)."""
    cls = type(model)
    ids, mask = ids.astype(jnp.int32), mask.astype(jnp.int32)
    batch, width = ids.shape
    ends = segment_ends(max_new_tokens)
    # loop step t writes slot width + t - 1, so steps t < e need width + e - 1 slots
    cache = init_cache(model.config, batch, width + (ends[0] if ends else max_new_tokens) - 1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    hidden, cache = model.apply(params, ids, mask, positions=positions, cache=cache, method=cls.hidden_states)
    # Left padding puts every row's last real token in the last column.
    first_logits = model.apply(params, hidden[:, -1:], method=cls.logits_from_hidden)[:, 0]
    next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)  # position of the first new token
    ones = jnp.ones((batch, 1), jnp.int32)
    head = _decode_output_kernel(model, params)

    def step(carry, last_tokens):
        cache, pos = carry
        hidden, cache = model.apply(params, last_tokens[:, None], ones, positions=pos[:, None], cache=cache,
                                    method=cls.hidden_states)
        if head is None:
            logits = model.apply(params, hidden, method=cls.logits_from_hidden)[:, 0]
        else:
            logits = linear(hidden[:, 0], head, jnp.float32)
        return logits, (cache, pos + 1)

    def grow(carry, end):
        cache, pos = carry
        return grow_cache(cache, width + end - 1), pos

    out, _ = decode_loop(
        step, (cache, next_pos), first_logits, rng=rng, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, greedy=greedy, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
        segment_ends=ends, grow=grow,
    )
    return out


class _BackendJit:
    """``jax.jit(fn)`` built on first use per platform, with that platform's compiler options (the
    platform programs are built for: ``rlhf_jax.devices.platform()``, the host's outside a plan).

    Deciding at import time would initialise the backend on ``import rlhf_jax`` (before a
    multi-host ``jax.distributed.initialize`` could run). Inside an outer ``jax.jit`` (traced
    arguments) the plain jit is used: compiler options belong to the top-level program.
    """

    def __init__(self, fn, static_argnames, options_by_backend):
        self._fn, self._static, self._options = fn, static_argnames, options_by_backend
        self._jitted: dict[str, Any] = {}
        self._nested = jax.jit(fn, static_argnames=static_argnames)

    def _get(self):
        plat = devices_lib.platform()
        if plat not in self._jitted:
            opts = self._options.get(plat)
            self._jitted[plat] = jax.jit(self._fn, static_argnames=self._static, compiler_options=opts)
        return self._jitted[plat]

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs)))
        return (self._nested if traced else self._get())(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._get()._cache_size()


_generate = _BackendJit(decode_program, ("model", "max_new_tokens", "greedy", "stop_token_ids", "pad_token_id"),
                        DECODE_COMPILER_OPTIONS)


def generate(
    model,
    params,
    prompt_ids: Array,
    prompt_mask: Array,
    *,
    rng: Array,
    max_new_tokens: int,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    greedy: bool = False,
    stop_token_ids: int | Sequence[int] = (),
    pad_token_id: int = 0,
    prompt_buckets: Sequence[int] | None = None,
) -> GenerationOutput:
    """Samples ``max_new_tokens`` tokens after each (left-padded) prompt.

    Args:
      model: an ``rlhf_jax.models.CausalLM`` (static: hashed by its config).
      params: its parameters ``{"params": ...}``.
      prompt_ids: ``[B, P]`` int, LEFT-padded; every row needs at least one real token.
      prompt_mask: ``[B, P]``, 1 on real prompt tokens.
      rng: PRNG key (may be None when ``greedy``); the output is a pure function of it (token ``t`` uses ``fold_in(rng, t)``).
      max_new_tokens: static ``N``.
      temperature: traced scalar ``T > 0``; sampling and log-probs use ``logits / T``.

    Bad arguments raise ``GenerationArgumentError`` (a ``ValueError``) before anything is compiled;
    values that are tracers of an outer ``jax.jit`` are not checked, shapes always are. A prompt
    longer than ``max_position_embeddings - max_new_tokens`` real tokens is refused.
      top_k: traced int scalar ``>= 0``; ``0`` disables.
      top_p: traced float scalar in ``(0, 1]``; ``1`` disables.
      greedy: static; argmax decoding (``T`` still scales the returned log-probs).
      stop_token_ids: static int or ints; a row ends after its first stop token.
      pad_token_id: static; written after a row's stop token and used to widen prompts.
      prompt_buckets: static prompt widths to pad up to (``None``: powers of two ``>= 16``).

    Returns:
      ``GenerationOutput`` with ``tokens [B, N]`` int32, ``logprobs [B, N]`` float32
      ``= log_softmax(logits / T)[token]`` (the unfiltered temperature-scaled distribution, so a
      full forward pass over prompt + response at the same ``T`` recomputes them exactly; 0 on pad),
      ``mask [B, N]`` int32 (1 up to and including the first stop token) and ``stopped [B]``.
    """
    _check_model(model)
    # numpy stays numpy until the jitted call (the bucket padding is then a host op)
    prompt_ids = prompt_ids if hasattr(prompt_ids, "shape") else np.asarray(prompt_ids)
    prompt_mask = prompt_mask if hasattr(prompt_mask, "shape") else np.asarray(prompt_mask)
    check_arguments(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, greedy=greedy, pad_token_id=pad_token_id)
    if rng is None:
        if not greedy:
            raise GenerationArgumentError("generate: rng is required for sampling (greedy=False)")
        rng = jax.random.key(0)  # unused by greedy decoding
    # Bucket before entering the jitted program: its cache is keyed on the input shape.
    width = bucket_length(prompt_ids.shape[1], prompt_buckets)
    prompt_ids, prompt_mask = left_pad_to(prompt_ids, prompt_mask, width, pad_token_id)
    return _generate(
        model, params, prompt_ids, prompt_mask, rng,
        jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens, greedy=bool(greedy), stop_token_ids=normalize_stop_ids(stop_token_ids),
        pad_token_id=pad_token_id,
    )
