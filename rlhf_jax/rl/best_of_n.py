"""Best-of-N as a policy (docs/MATH.md, "Best-of-N"): one jitted sampler of ``n`` responses per prompt,
the unbiased estimator of best-of-N reward for every ``N <= n`` from those samples, the analytic KL of
best-of-N, and the selection rejection-sampling fine-tuning trains on.

Estimator (Nakano et al. 2021; Gao et al. 2022): sort a prompt's ``n`` samples by proxy reward,
ascending, ``s_(1) <= ... <= s_(n)``. A uniformly random ``N``-subset has its proxy-best at sorted
position ``i`` with probability ``C(i-1, N-1) / C(n, N)`` (the other ``N-1`` members come from the
``i-1`` below it), so for any per-sample value ``v`` (gold or proxy)

    E[v(best of N)] = sum_i C(i-1, N-1) / C(n, N) · v_(i)

averaged over prompts. Ties in the proxy are broken by the sample's index (a later sample ranks
higher), the same rule :func:`argmax_proxy` uses. ``KL(best-of-N || π) = log N - (N-1)/N``.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation import generate

Array = jax.Array


def _check_ns(n: int, ns: Sequence[int]) -> tuple[int, ...]:
    ns = tuple(int(N) for N in ns)
    if n < 1:
        raise ValueError(f"best_of_n: need n >= 1 samples per prompt, got n={n}")
    bad = [N for N in ns if not 1 <= N <= n]
    if bad:
        raise ValueError(f"best_of_n: every N must satisfy 1 <= N <= n={n}; got {bad}")
    return ns


def bon_weights(n: int, ns: Sequence[int]) -> np.ndarray:
    """``[len(ns), n]`` float64: row ``j`` holds ``C(i-1, N_j-1) / C(n, N_j)`` for sorted positions
    ``i = 1..n`` (ascending proxy); each row sums to 1. Log-gamma keeps large ``n`` exact enough."""
    ns = _check_ns(n, ns)
    i = np.arange(1, n + 1, dtype=np.float64)
    out = np.zeros((len(ns), n), np.float64)
    lg = math.lgamma
    for j, N in enumerate(ns):
        log_cn = lg(n + 1) - lg(N + 1) - lg(n - N + 1)
        ok = i >= N
        k = i[ok] - 1  # C(k, N-1)
        log_c = np.array([lg(a + 1) - lg(N) - lg(a - N + 2) for a in k])
        out[j, ok] = np.exp(log_c - log_cn)
    return out


def sort_by_proxy(proxy: Array) -> Array:
    """Indices ``[P, n]`` that sort each prompt's samples by proxy, ascending; ties keep index order
    (so the later sample ranks higher)."""
    return jnp.argsort(proxy, axis=-1, stable=True)


def best_of_n_estimates(proxy: Array, values: dict[str, Array], ns: Sequence[int]) -> dict[str, Array]:
    """Unbiased best-of-N means for every ``N`` in ``ns`` from ``n`` samples per prompt.

    Args:
      proxy: ``[P, n]`` proxy reward (the selection criterion).
      values: name -> ``[P, n]`` per-sample values to report under best-of-N selection (e.g. gold,
        proxy).
      ns: the ``N`` values (each ``1 <= N <= n``).
    Returns name -> ``[len(ns)]`` float32, the mean over prompts of ``E[v(best of N)]``.
    """
    proxy = jnp.asarray(proxy, jnp.float32)
    if proxy.ndim != 2:
        raise ValueError(f"best_of_n_estimates: proxy must be [P, n], got shape {proxy.shape}")
    w = jnp.asarray(bon_weights(proxy.shape[1], ns), jnp.float32)
    order = sort_by_proxy(proxy)
    out = {}
    for name, v in values.items():
        v = jnp.asarray(v, jnp.float32)
        if v.shape != proxy.shape:
            raise ValueError(f"best_of_n_estimates: values[{name!r}] has shape {v.shape}, proxy {proxy.shape}")
        sorted_v = jnp.take_along_axis(v, order, axis=-1)          # [P, n]
        out[name] = jnp.mean(sorted_v @ w.T, axis=0)               # [len(ns)]
    return out


def best_of_n_kl(ns) -> np.ndarray:
    """The analytic ``KL(best-of-N || π) = log N - (N - 1)/N`` (nats) for each ``N``."""
    ns = np.asarray(ns, np.float64)
    if np.any(ns < 1):
        raise ValueError(f"best_of_n_kl: N must be >= 1, got {ns.tolist()}")
    return np.log(ns) - (ns - 1) / ns


def argmax_proxy(proxy: Array) -> Array:
    """``[P]`` index of each prompt's proxy-best sample (ties: the later sample, as the estimator)."""
    n = proxy.shape[-1]
    return n - 1 - jnp.argmax(proxy[..., ::-1], axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "n", "max_new_tokens", "stop_token_ids", "pad_token_id"))
def sample_n(model, params, prompt_ids: Array, prompt_mask: Array, rng: Array, temperature, *, n: int,
             max_new_tokens: int, stop_token_ids: tuple[int, ...], pad_token_id: int) -> dict[str, Array]:
    """``n`` samples per prompt in one compiled program (the project's generation, KV cache).

    Returns ``prompt_ids, prompt_mask [P·n, L]`` (each prompt repeated ``n`` times, contiguously),
    ``tokens, mask, logprobs [P·n, T]``."""
    return sample_n_pure(model, params, prompt_ids, prompt_mask, rng, temperature, n=n,
                         max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)


def sample_n_pure(model, params, prompt_ids, prompt_mask, rng, temperature, *, n, max_new_tokens, stop_token_ids,
                  pad_token_id) -> dict[str, Array]:
    """:func:`sample_n` without its own ``jit`` (call it inside a compiled step)."""
    ids = jnp.repeat(prompt_ids, n, axis=0)
    mask = jnp.repeat(prompt_mask, n, axis=0)
    out = generate(model, params, ids, mask, rng=rng, max_new_tokens=max_new_tokens, temperature=temperature,
                   stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, prompt_buckets=(ids.shape[1],))
    return {"prompt_ids": ids, "prompt_mask": mask, "tokens": out.tokens, "mask": out.mask.astype(mask.dtype),
            "logprobs": out.logprobs}
