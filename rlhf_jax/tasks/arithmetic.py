"""``arith``: add a list of digits, showing the running sums (a verifiable-reward task with reasoning steps).

Prompt: ``add d_1 … d_n :`` with 3 ≤ n ≤ 5 digits 1–5. Response: the running sums
``s_1 … s_n`` (``s_j = d_1 + … + d_j``), so the last word is the answer ``s_n``; every step is one
addition the model must get right, and an early slip carries into every later sum.

Gold reward, with ``r`` the response words before the first EOS (length m; a word that is not a
number is wrong at its position) and ``finished`` = the response ended with EOS:

    gold = ½ · #{ j < min(m, n) : r_j = s_j } / max(m, n)   +   ½ · [finished ∧ m ≥ 1 ∧ r_{m−1} = s_n]

graded credit for the steps (missing or extra steps grow the denominator) plus an exact check of the
final answer, as verifiable-reward (math) tasks are scored; ∈ [0, 1], 1 only for the full correct chain.

The SFT demonstrator makes an arithmetic slip at each step with probability 0.2 (an offset of ±1 or ±2
that carries into every later sum) and now and then skips or repeats a step (gold ≈ 0.5).
Policy-like responses for the labeller use a per-response slip rate ``0.6·(1 − q)``, ``q ~ U(0, 1)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.tasks.base import SPECIAL_TOKENS, Task, words_before_eos_mask

MIN_LEN, MAX_LEN = 3, 5
MAX_DIGIT = 5
MAX_SUM = 25  # numbers 0..25 are words (5·5 = 25 is the largest sum)
NUMBERS = tuple(str(v) for v in range(MAX_SUM + 1))


class ArithmeticTask(Task):
    name = "arith"
    description = "add 3-5 digits (1-5) showing the running sums (steps graded, final answer checked exactly)"
    vocab = SPECIAL_TOKENS + ("add", ":") + NUMBERS
    prompt_length = MAX_LEN + 2
    response_length = MAX_LEN + 4
    default_noise = 0.1
    seed_base = 9203

    def __init__(self):
        ids = self.token_to_id
        # value_of[v] = the number of token v, -1 for the other words
        self._value_of = np.full(self.vocab_size, -1, np.int32)
        self._value_of[[ids[w] for w in NUMBERS]] = np.arange(MAX_SUM + 1)

    def _model_overrides(self):
        return {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4,
                "head_dim": 16, "intermediate_size": 192}

    # ------------------------------------------------------------------ gold reward
    @staticmethod
    def _running_sums(prompt_words):
        return np.cumsum([int(w) for w in prompt_words if w in NUMBERS]).tolist()

    def _gold_words(self, prompt_words, response_words, finished):
        sums = self._running_sums(prompt_words)
        n, m = len(sums), len(response_words)
        if max(n, m) == 0:
            return 0.0
        steps = sum(1 for j in range(min(n, m)) if response_words[j] == str(sums[j]))
        answer = finished and m >= 1 and n >= 1 and response_words[-1] == str(sums[-1])
        return 0.5 * steps / max(n, m) + 0.5 * float(answer)

    def _gold_jax(self, prompt_ids, prompt_mask, response_ids, response_mask):
        value_of = jnp.asarray(self._value_of)
        p_val = value_of[prompt_ids]                                             # [B,P]
        is_num = (p_val >= 0) & (prompt_mask > 0)
        vals = jnp.where(is_num, p_val, 0)
        running = jnp.cumsum(vals, axis=-1)                                      # sum up to position p
        rank = jnp.cumsum(is_num, axis=-1) - 1                                   # index of the digit at p
        r = response_ids.shape[1]
        onehot = jax.nn.one_hot(jnp.where(is_num, rank, -1), r, dtype=jnp.int32)  # [B,P,R]
        target = jnp.einsum("bp,bpr->br", running, onehot)                        # [B,R] s_j (0 past n)
        n = is_num.sum(-1).astype(jnp.float32)
        total = running[:, -1]
        words, finished = words_before_eos_mask(response_ids, response_mask, self.eos_id)
        m = words.sum(-1)
        j = jnp.arange(r, dtype=jnp.float32)
        r_val = value_of[response_ids]
        # response words are contiguous from position 0 (right padding), so position = index
        in_both = (j[None, :] < jnp.minimum(m, n)[:, None]) & (words > 0)
        steps = (in_both & (r_val == target)).sum(-1)
        last = jnp.take_along_axis(r_val, jnp.maximum(m - 1, 0).astype(jnp.int32)[:, None], axis=1)[:, 0]
        answer = finished & (m >= 1) & (n >= 1) & (last == total)
        denom = jnp.maximum(jnp.maximum(m, n), 1.0)
        gold = 0.5 * steps / denom + 0.5 * answer.astype(jnp.float32)
        return jnp.where(jnp.maximum(m, n) > 0, gold, 0.0).astype(jnp.float32)

    # ------------------------------------------------------------------ generators
    def _sample_prompt(self, rng):
        n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        return ["add"] + [NUMBERS[d] for d in rng.integers(1, MAX_DIGIT + 1, size=n)] + [":"]

    def _work(self, rng, prompt, slip, p_skip):
        digits = [int(w) for w in prompt if w in NUMBERS]
        out, acc = [], 0
        for d in digits:
            acc += d
            if rng.random() < slip:  # an arithmetic slip carries into every later sum
                acc += int(rng.choice([-2, -1, 1, 2]))
            acc = min(max(acc, 0), MAX_SUM)
            out.append(NUMBERS[acc])
        u = rng.random()
        if u < p_skip and len(out) > 1:
            del out[rng.integers(len(out) - 1)]
        elif u < 2 * p_skip:
            i = int(rng.integers(len(out)))
            out.insert(i, out[i])
        return out

    def _demonstration(self, rng, prompt):
        return self._work(rng, prompt, 0.2, 0.05)

    def _policy_like(self, rng, prompt):
        q = rng.random()
        return self._work(rng, prompt, 0.6 * (1 - q), 0.1 * (1 - q))

    def optimal_response(self, prompt):
        return " " + " ".join(str(s) for s in self._running_sums(prompt.split()))
