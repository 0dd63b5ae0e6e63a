"""``sentiment``: write a positive, on-topic review of a requested aspect (the default task).

Prompt: ``review <topic> <aspect> :`` — one of 6 topics and one of its 3 aspect nouns (18 prompts).
Response: short clauses such as ``plot is very great and actor was superb``.

Gold reward (words before the first EOS; ``n`` their number):

    sentiment = clip((#distinct positive adjectives − #negative adjectives) / 2, 0, 1)
    relevance = clip(0.6·[aspect mentioned] + 0.4·[another noun of the topic mentioned]
                     − 0.5·#nouns of other topics, 0, 1)
    form      = [finished with EOS] · [3 ≤ n ≤ 12]
    gold      = 0.5·sentiment + 0.3·relevance + 0.2·form                      ∈ [0, 1]

Repeating a positive adjective earns nothing (only distinct ones count), so a proxy that learnt
"more positive words is better" can be gamed by repetition — the over-optimisation a study of gold
vs proxy reward looks for — while a faithful policy reaches 1.0.

The SFT demonstrator writes 1–3 clauses with adjectives drawn 45 % positive / 20 % negative /
35 % neutral and nouns 50 % the aspect / 35 % another topic noun / 15 % off-topic: fluent but
mediocre (gold ≈ 0.5). Policy-like responses for the labeller use the same grammar with a quality
``q ~ U(0, 1)`` per response that moves these probabilities from bad to good, plus occasional
repetitions, so pairs span the whole reward range.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.tasks.base import SPECIAL_TOKENS, Task, words_before_eos_mask

TOPICS = {
    "food": ("taste", "dish", "chef"),
    "movie": ("plot", "actor", "scene"),
    "hotel": ("room", "staff", "bed"),
    "phone": ("screen", "battery", "camera"),
    "book": ("story", "author", "chapter"),
    "game": ("level", "graphics", "controls"),
}
POSITIVE = ("great", "excellent", "wonderful", "lovely", "superb", "brilliant", "delightful",
            "amazing", "charming", "perfect")
NEGATIVE = ("bad", "awful", "boring", "poor", "terrible", "dull", "weak", "broken", "noisy", "bland")
NEUTRAL = ("okay", "fine", "average", "fair", "normal", "usual")
FUNCTION = ("the", "is", "was", "and", "very", "quite", "really", "also")
PROMPT_WORDS = ("review", ":")

MIN_WORDS, MAX_WORDS = 3, 12


def _vocab() -> tuple[str, ...]:
    nouns = tuple(n for t in TOPICS for n in TOPICS[t])
    return SPECIAL_TOKENS + PROMPT_WORDS + tuple(TOPICS) + nouns + POSITIVE + NEGATIVE + NEUTRAL + FUNCTION


class SentimentTask(Task):
    name = "sentiment"
    description = "write a positive review of the requested aspect of a topic (graded sentiment, relevance, form)"
    vocab = _vocab()
    prompt_length = 4
    response_length = 16
    default_noise = 0.1
    seed_base = 8101

    def __init__(self):
        ids = self.token_to_id
        v = self.vocab_size
        self._topic_of = {n: t for t, ns in TOPICS.items() for n in ns}
        self._is_pos = np.zeros(v, np.float32)
        self._is_neg = np.zeros(v, np.float32)
        self._is_noun = np.zeros(v, np.float32)
        # noun_topic[v, t] = 1 when word v is a noun of topic t
        self._noun_topic = np.zeros((v, len(TOPICS)), np.float32)
        for w in POSITIVE:
            self._is_pos[ids[w]] = 1
        for w in NEGATIVE:
            self._is_neg[ids[w]] = 1
        for t_index, (t, ns) in enumerate(TOPICS.items()):
            for n in ns:
                self._is_noun[ids[n]] = 1
                self._noun_topic[ids[n], t_index] = 1

    # ------------------------------------------------------------------ gold reward
    def _gold_words(self, prompt_words, response_words, finished):
        aspects = [w for w in prompt_words if w in self._topic_of]
        topic = self._topic_of[aspects[0]] if aspects else None
        aspect = aspects[0] if aspects else None
        distinct = set(response_words)
        n_pos = sum(1 for w in distinct if w in POSITIVE)
        n_neg = sum(1 for w in response_words if w in NEGATIVE)
        sentiment = min(max((n_pos - n_neg) / 2.0, 0.0), 1.0)
        on_topic = set(TOPICS[topic]) if topic else set()
        has_aspect = float(aspect is not None and aspect in distinct)
        has_other = float(any(w in distinct for w in on_topic if w != aspect))
        off_topic = sum(1 for w in response_words if w in self._topic_of and w not in on_topic)
        relevance = min(max(0.6 * has_aspect + 0.4 * has_other - 0.5 * off_topic, 0.0), 1.0)
        form = float(finished and MIN_WORDS <= len(response_words) <= MAX_WORDS)
        return 0.5 * sentiment + 0.3 * relevance + 0.2 * form

    def _gold_jax(self, prompt_ids, prompt_mask, response_ids, response_mask):
        v = self.vocab_size
        is_pos, is_neg = jnp.asarray(self._is_pos), jnp.asarray(self._is_neg)
        is_noun, noun_topic = jnp.asarray(self._is_noun), jnp.asarray(self._noun_topic)
        # the aspect: the (first) noun of the prompt → one-hot [B, V]; its topic [B, T]
        prompt_nouns = jax.nn.one_hot(prompt_ids, v) * (prompt_mask[..., None] * is_noun)  # [B,P,V]
        first = jnp.cumsum(prompt_nouns.sum(-1), axis=-1) == 1                           # [B,P]
        aspect = (prompt_nouns * first[..., None]).sum(1)                                  # [B,V]
        topic = aspect @ noun_topic                                                         # [B,T]
        on_topic = topic @ noun_topic.T                                                     # [B,V]
        words, finished = words_before_eos_mask(response_ids, response_mask, self.eos_id)
        counts = (jax.nn.one_hot(response_ids, v) * words[..., None]).sum(1)              # [B,V]
        distinct = (counts > 0).astype(jnp.float32)
        n_pos = distinct @ is_pos
        n_neg = counts @ is_neg
        sentiment = jnp.clip((n_pos - n_neg) / 2.0, 0.0, 1.0)
        has_aspect = (distinct * aspect).sum(-1) > 0
        has_other = (distinct * on_topic * (1 - aspect)).sum(-1) > 0
        off_topic = (counts * is_noun * (1 - on_topic)).sum(-1)
        relevance = jnp.clip(0.6 * has_aspect + 0.4 * has_other - 0.5 * off_topic, 0.0, 1.0)
        n = words.sum(-1)
        form = (finished & (n >= MIN_WORDS) & (n <= MAX_WORDS)).astype(jnp.float32)
        return (0.5 * sentiment + 0.3 * relevance + 0.2 * form).astype(jnp.float32)

    # ------------------------------------------------------------------ generators
    def _sample_prompt(self, rng):
        topic = list(TOPICS)[rng.integers(len(TOPICS))]
        aspect = TOPICS[topic][rng.integers(3)]
        return ["review", topic, aspect, ":"]

    def _response(self, rng, prompt, *, p_pos, p_neg, p_aspect, p_other, n_clauses, p_repeat):
        topic, aspect = prompt[1], prompt[2]
        others = [n for n in TOPICS[topic] if n != aspect]
        off = [n for t, ns in TOPICS.items() if t != topic for n in ns]
        words: list[str] = []
        used_adj: list[str] = []
        for c in range(n_clauses):
            u = rng.random()
            if u < p_aspect:
                noun = aspect
            elif u < p_aspect + p_other:
                noun = others[rng.integers(len(others))]
            else:
                noun = off[rng.integers(len(off))]
            u = rng.random()
            if used_adj and rng.random() < p_repeat:
                adj = used_adj[rng.integers(len(used_adj))]
            elif u < p_pos:
                adj = POSITIVE[rng.integers(len(POSITIVE))]
            elif u < p_pos + p_neg:
                adj = NEGATIVE[rng.integers(len(NEGATIVE))]
            else:
                adj = NEUTRAL[rng.integers(len(NEUTRAL))]
            used_adj.append(adj)
            if c:
                words.append("and")
            words += [noun, "is" if rng.random() < 0.7 else "was"]
            if rng.random() < 0.3:
                words.append(("very", "quite", "really")[rng.integers(3)])
            words.append(adj)
        return words

    def _demonstration(self, rng, prompt):
        n_clauses = int(rng.choice([1, 2, 3], p=[0.3, 0.5, 0.2]))
        return self._response(rng, prompt, p_pos=0.45, p_neg=0.2, p_aspect=0.5, p_other=0.35,
                              n_clauses=n_clauses, p_repeat=0.1)

    def _policy_like(self, rng, prompt):
        q = rng.random()
        n_clauses = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        return self._response(rng, prompt, p_pos=0.1 + 0.8 * q, p_neg=0.5 * (1 - q),
                              p_aspect=0.2 + 0.6 * q, p_other=0.3, n_clauses=n_clauses,
                              p_repeat=0.25 * rng.random())

    def optimal_response(self, prompt):
        words = [w for w in prompt.split() if w not in SPECIAL_TOKENS]
        topic, aspect = words[1], words[2]
        other = next(n for n in TOPICS[topic] if n != aspect)
        return " {} is great and {} is superb".format(aspect, other)
