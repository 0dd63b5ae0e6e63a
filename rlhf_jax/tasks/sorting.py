"""``sort``: sort a list of digits (an algorithmic task with positional partial credit).

Prompt: ``sort d_1 … d_n :`` with 3 ≤ n ≤ 6 digits 0–9. Response: the digits in ascending order.

Gold reward, with ``t = sorted(d)`` (length n) and ``r`` the response words before the first EOS
(length m; any non-digit word is simply wrong at its position):

    gold = #{ j < min(m, n) : r_j = t_j } / max(m, n)                              ∈ [0, 1]

so every correct position earns 1/n, and missing or extra words cost by growing the denominator.
In JAX the target needs no sort: with ``c_d`` = #{i : d_i ≤ d} (cumulative digit histogram),
``t_j = #{d ∈ 0..9 : c_d ≤ j}``.

The SFT demonstrator writes the sorted list but replaces each position, with probability 0.45, by a
uniformly random digit, and now and then drops or duplicates one (gold ≈ 0.57). Policy-like
responses for the labeller use a per-response corruption rate ``0.8·(1 − q)``, ``q ~ U(0, 1)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.tasks.base import SPECIAL_TOKENS, Task, words_before_eos_mask

DIGITS = tuple(str(d) for d in range(10))
MIN_LEN, MAX_LEN = 3, 6


class SortTask(Task):
    name = "sort"
    description = "sort 3-6 digits ascending (graded by the fraction of correct positions)"
    vocab = SPECIAL_TOKENS + ("sort", ":") + DIGITS
    prompt_length = MAX_LEN + 2
    response_length = MAX_LEN + 4
    default_noise = 0.1
    seed_base = 8102

    def __init__(self):
        ids = self.token_to_id
        self._digit_ids = np.array([ids[d] for d in DIGITS], np.int32)
        # digit_of[v] = the digit of token v, -1 for non-digits
        self._digit_of = np.full(self.vocab_size, -1, np.int32)
        self._digit_of[self._digit_ids] = np.arange(10)

    def _model_overrides(self):
        return {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4,
                "head_dim": 16, "intermediate_size": 192}

    # ------------------------------------------------------------------ gold reward
    def _gold_words(self, prompt_words, response_words, finished):
        target = sorted(int(w) for w in prompt_words if w in DIGITS)
        n, m = len(target), len(response_words)
        if max(n, m) == 0:
            return 0.0
        hits = sum(1 for j in range(min(n, m)) if response_words[j] == str(target[j]))
        return hits / max(n, m)

    def _gold_jax(self, prompt_ids, prompt_mask, response_ids, response_mask):
        digit_of = jnp.asarray(self._digit_of)
        p_digit = digit_of[prompt_ids]                                          # [B,P]
        hist = (jax.nn.one_hot(p_digit, 10) * prompt_mask[..., None]).sum(1)   # [B,10]; -1 → 0 row
        n = hist.sum(-1)                                                         # [B]
        cum = jnp.cumsum(hist, axis=-1)                                          # c_d
        words, _ = words_before_eos_mask(response_ids, response_mask, self.eos_id)
        r = response_ids.shape[1]
        j = jnp.arange(r, dtype=jnp.float32)
        target = (cum[:, None, :] <= j[None, :, None]).sum(-1)                  # [B,R] t_j
        # response words are contiguous from position 0 (right padding), so position = index
        m = words.sum(-1)
        in_both = (j[None, :] < jnp.minimum(m, n)[:, None]) & (words > 0)
        hits = (in_both & (digit_of[response_ids] == target)).sum(-1)
        denom = jnp.maximum(jnp.maximum(m, n), 1.0)
        return jnp.where(jnp.maximum(m, n) > 0, hits / denom, 0.0).astype(jnp.float32)

    # ------------------------------------------------------------------ generators
    def _sample_prompt(self, rng):
        n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        return ["sort"] + [DIGITS[d] for d in rng.integers(0, 10, size=n)] + [":"]

    def _corrupt(self, rng, prompt, rate, p_len):
        target = sorted(w for w in prompt if w in DIGITS)
        out = [DIGITS[rng.integers(10)] if rng.random() < rate else w for w in target]
        u = rng.random()
        if u < p_len and len(out) > 1:
            del out[rng.integers(len(out))]
        elif u < 2 * p_len:
            i = int(rng.integers(len(out)))
            out.insert(i, out[i])
        return out

    def _demonstration(self, rng, prompt):
        return self._corrupt(rng, prompt, 0.45, 0.05)

    def _policy_like(self, rng, prompt):
        q = rng.random()
        return self._corrupt(rng, prompt, 0.8 * (1 - q), 0.1 * (1 - q))

    def optimal_response(self, prompt):
        return " " + " ".join(sorted(w for w in prompt.split() if w in DIGITS))
