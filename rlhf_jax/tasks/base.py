"""The shared machinery of the embedded gold-reward tasks.

A task is a tiny synthetic language with a word-level vocabulary (one token per word, ids fixed by
the order of ``Task.vocab``), a deterministic generator of prompts, a noisy SFT demonstrator, a
"policy-like" response sampler whose quality varies from response to response, and a **gold
reward** in [0, 1] that plays the human: it is computed in JAX on token ids
(``gold_reward_jax``, jit/vmap-able) and in Python on text (``gold_reward_text``), and the two agree.

Text conventions (what the records contain):
  * ``prompt``: words separated by single spaces, no special tokens, no trailing space
    (e.g. ``"review movie plot :"``).
  * completions / chosen / rejected / responses: a LEADING space then words (``" the plot is
    great"``), so that both ``prompt + completion`` and tokenising the two parts separately give
    the same ids. No ``<eos>``: the data layer appends the tokenizer's EOS.
  * Every record is produced from ``numpy.random.default_rng((task_seed, split, stream, seed))``,
    so the same arguments always give the same records, and the preference *pairs* do not depend
    on the labeller noise (only the labels do) — the noiseless order of the same pairs is what a
    reward model is evaluated against.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.resources
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import ModelConfig
from rlhf_jax.tasks.labeller import plackett_luce_ranks

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
SPLITS = ("train", "validation", "test")

# Record streams: each kind of record draws from its own random stream.
_STREAMS = {"sft": 1, "pairs": 2, "pair_labels": 3, "rankings": 4, "ranking_labels": 5, "prompts": 6}

# Default number of records per (kind, split); the pipeline sizes its runs from these.
DEFAULT_SIZES = {
    "sft": {"train": 4096, "validation": 256, "test": 512},
    "pairs": {"train": 4096, "validation": 256, "test": 512},
    "rankings": {"train": 1024, "validation": 128, "test": 256},
    "prompts": {"train": 2048, "validation": 256, "test": 256},
}


def assets_root() -> str:
    """Directory that holds one tokenizer directory per task (shipped as package data)."""
    return str(importlib.resources.files("rlhf_jax.tasks") / "assets")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return SPLITS.index(split)


def _check_num(num: int | None, kind: str, split: str) -> int:
    _check_split(split)
    if num is None:
        return DEFAULT_SIZES[kind][split]
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be an integer ≥ 0, got {num!r}")
    return int(num)


def _check_noise(noise: float) -> float:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not np.isfinite(noise) \
            or noise < 0:
        raise ValueError(f"labeller noise must be a finite number ≥ 0, got {noise!r}")
    return float(noise)


def words_before_eos_mask(response_ids: jax.Array, response_mask: jax.Array, eos_id: int
                          ) -> tuple[jax.Array, jax.Array]:
    """Mask of the response tokens strictly before the first EOS, and whether an EOS was seen.

    Args:
      response_ids: ``[B, R]`` int token ids (right-padded).
      response_mask: ``[B, R]`` 1 on real response tokens (the generation convention: up to and
        including the first stop token).
      eos_id: the EOS id.
    Returns:
      ``(words [B, R] float32, finished [B] bool)``: ``words[b, t] = mask[b, t] · [no EOS in
      mask[b, :t+1]]``; ``finished[b]`` = a real token of row b is EOS.
    """
    mask = response_mask.astype(jnp.int32)
    is_eos = (response_ids == eos_id).astype(jnp.int32) * mask
    seen = jnp.cumsum(is_eos, axis=-1)
    words = (mask * (seen == 0)).astype(jnp.float32)
    return words, seen[:, -1] > 0


class Task(abc.ABC):
    """An embedded task. Subclasses define the language, the generators and the gold reward.

    Public API (``docs/DESIGN.md``, "Tasks"): ``name``, ``tokenizer_dir``, ``model_config()``,
    ``gold_reward_jax``, ``gold_reward_text``, ``sft_records``, ``preference_records``,
    ``ranking_records``, ``prompt_records``; plus ``prompt_length`` / ``response_length`` (token
    budgets the pipeline uses), ``encode`` / ``decode`` and ``vocab``.
    """

    name: str = ""
    description: str = ""
    #: words of the vocabulary in id order; the four special tokens come first
    vocab: tuple[str, ...] = ()
    #: max tokens of a prompt (no BOS is added) and max new tokens of a response (EOS included)
    prompt_length: int = 0
    response_length: int = 0
    #: labeller noise the pipeline uses by default (BT temperature on the [0, 1] gold scale)
    default_noise: float = 0.1
    #: a fixed integer that namespaces this task's random streams
    seed_base: int = 0

    # ---------------------------------------------------------------- vocabulary and text
    @functools.cached_property
    def token_to_id(self) -> dict[str, int]:
        ids = {w: i for i, w in enumerate(self.vocab)}
        if len(ids) != len(self.vocab):
            raise ValueError(f"task {self.name!r}: duplicate words in the vocabulary")
        if tuple(self.vocab[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"task {self.name!r}: the vocabulary must start with {SPECIAL_TOKENS}")
        return ids

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD]

    @property
    def bos_id(self) -> int:
        return self.token_to_id[BOS]

    @property
    def eos_id(self) -> int:
        return self.token_to_id[EOS]

    @property
    def unk_id(self) -> int:
        return self.token_to_id[UNK]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def tokenizer_dir(self) -> str:
        """The task's Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained`` loads it)."""
        return os.path.join(assets_root(), self.name)

    def encode(self, text: str) -> list[int]:
        """Word-level ids of ``text`` (whitespace split; unknown words → ``<unk>``)."""
        table = self.token_to_id
        return [table.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
        """Words of ``ids`` joined by spaces; pads dropped, stops at the first EOS by default."""
        out = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_id:
                break
            if i == self.pad_id:
                continue
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else UNK)
        return " ".join(out)

    # ---------------------------------------------------------------- model
    def model_config(self, **overrides: Any):
        """The tiny llama-style ``rlhf_jax.models.ModelConfig`` this task trains from scratch."""
        fields = dict(
            arch="llama", vocab_size=self.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, intermediate_size=128,
            max_position_embeddings=self.prompt_length + self.response_length + 8,
            tie_word_embeddings=True, bos_token_id=self.bos_id, eos_token_id=self.eos_id,
            pad_token_id=self.pad_id)
        fields.update(self._model_overrides())
        fields.update(overrides)
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"task {self.name!r}: ModelConfig has no field {unknown[0]!r}")
        return ModelConfig(**fields)

    def _model_overrides(self) -> dict[str, Any]:
        return {}

    # ---------------------------------------------------------------- gold reward
    def gold_reward_jax(self, prompt_ids: jax.Array, prompt_mask: jax.Array,
                        response_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
        """Gold reward ``[B]`` float32 in [0, 1] of token-id batches (jit/vmap-able).

        Args:
          prompt_ids: ``[B, P]`` ids, left- or right-padded; ``prompt_mask`` ``[B, P]`` 1 on real
            tokens (special tokens such as BOS are ignored).
          response_ids: ``[B, R]`` ids, right-padded; ``response_mask`` ``[B, R]`` 1 on real
            tokens. Words count up to the first EOS; a response with no EOS is unfinished.
        """
        prompt_ids = jnp.asarray(prompt_ids)
        response_ids = jnp.asarray(response_ids)
        if prompt_ids.ndim != 2 or response_ids.ndim != 2 or prompt_ids.shape[0] != response_ids.shape[0]:
            raise ValueError(
                f"gold_reward_jax: expected prompt [B,P] and response [B,R] ids, got "
                f"{prompt_ids.shape} and {response_ids.shape}")
        if jnp.shape(prompt_mask) != prompt_ids.shape or jnp.shape(response_mask) != response_ids.shape:
            raise ValueError(
                f"gold_reward_jax: mask shapes {jnp.shape(prompt_mask)}, {jnp.shape(response_mask)} "
                f"do not match ids {prompt_ids.shape}, {response_ids.shape}")
        # ids the tokenizer does not know (a policy whose vocab is padded) read as <unk>
        v = self.vocab_size
        prompt_ids = jnp.where((prompt_ids >= 0) & (prompt_ids < v), prompt_ids, self.unk_id)
        response_ids = jnp.where((response_ids >= 0) & (response_ids < v), response_ids, self.unk_id)
        return self._gold_jax(prompt_ids, jnp.asarray(prompt_mask).astype(jnp.float32),
                              response_ids, jnp.asarray(response_mask))

    def gold_reward_text(self, prompt: str, response: str, *, finished: bool = True) -> float:
        """Gold reward of a text response; agrees with :meth:`gold_reward_jax` on its tokens.

        ``response`` is read up to a literal ``<eos>`` word if it has one (then it is finished);
        otherwise ``finished`` says whether the response ended (the records' completions did: the
        data layer appends EOS) or was cut at the token budget.
        """
        words = response.split()
        if EOS in words:
            words = words[:words.index(EOS)]
            finished = True
        prompt_words = [w for w in prompt.split() if w not in SPECIAL_TOKENS]
        table = self.token_to_id
        words = [w if w in table else UNK for w in words]
        prompt_words = [w if w in table else UNK for w in prompt_words]
        return float(self._gold_words(prompt_words, words, bool(finished)))

    @abc.abstractmethod
    def _gold_jax(self, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        """Implemented by each task."""

    @abc.abstractmethod
    def _gold_words(self, prompt_words: list[str], response_words: list[str], finished: bool) -> float:
        """Implemented by each task."""

    # ---------------------------------------------------------------- generators (subclasses)
    @abc.abstractmethod
    def _sample_prompt(self, rng: np.random.Generator) -> list[str]:
        """Implemented by each task."""

    @abc.abstractmethod
    def _demonstration(self, rng: np.random.Generator, prompt: list[str]) -> list[str]:
        """Implemented by each task."""

    @abc.abstractmethod
    def _policy_like(self, rng: np.random.Generator, prompt: list[str]) -> list[str]:
        """Implemented by each task."""

    @abc.abstractmethod
    def optimal_response(self, prompt: str) -> str:
        """A response with gold reward 1 (for tests and as a ceiling in reports)."""

    # ---------------------------------------------------------------- records
    def _rng(self, split: str, stream: str, seed: int) -> np.random.Generator:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}")
        return np.random.default_rng((self.seed_base, _check_split(split), _STREAMS[stream], int(seed)))

    def _gold(self, prompt: list[str], response: list[str]) -> float:
        return float(self._gold_words(prompt, response, True))

    @staticmethod
    def _text(words: Sequence[str]) -> str:
        return " ".join(words)

    @staticmethod
    def _response_text(words: Sequence[str]) -> str:
        return " " + " ".join(words)

    def sft_records(self, split: str, *, num: int | None = None, seed: int = 0
                    ) -> list[dict[str, str]]:
        """``{"prompt", "completion"}`` demonstrations from the noisy demonstrator."""
        n = _check_num(num, "sft", split)
        rng = self._rng(split, "sft", seed)
        out = []
        for _ in range(n):
            p = self._sample_prompt(rng)
            out.append({"prompt": self._text(p), "completion": self._response_text(self._demonstration(rng, p))})
        return out

    def _distinct_responses(self, rng: np.random.Generator, prompt: list[str], k: int
                            ) -> tuple[list[list[str]], list[float]] | None:
        """K policy-like responses with pairwise distinct gold (None if the prompt cannot give it)."""
        responses, golds = [], []
        for _ in range(k):
            for _attempt in range(32):
                r = self._policy_like(rng, prompt)
                g = self._gold(prompt, r)
                if all(abs(g - h) > 1e-6 for h in golds):
                    responses.append(r)
                    golds.append(g)
                    break
            else:
                return None
        return responses, golds

    def _groups(self, split: str, stream: str, num: int, k: int, seed: int):
        rng = self._rng(split, stream, seed)
        groups = []
        while len(groups) < num:
            p = self._sample_prompt(rng)
            got = self._distinct_responses(rng, p, k)
            if got is not None:
                groups.append((p, got[0], got[1]))
        return groups

    def preference_records(self, split: str, noise: float | None = None, *, num: int | None = None,
                           seed: int = 0, with_gold: bool = False) -> list[dict[str, Any]]:
        """``{"prompt", "chosen", "rejected"}`` pairs labelled by the simulated labeller.

        Both responses of a pair are policy-like samples for the same prompt, with distinct gold
        rewards; the labeller prefers one by Bradley–Terry sampling with temperature ``noise``
        (``None`` → ``default_noise``; 0 → the noiseless gold order). The pairs are the same for
        every ``noise``. ``with_gold=True`` adds ``chosen_gold`` / ``rejected_gold`` floats
        (evaluation only; not part of the data-layer format).
        """
        noise = _check_noise(self.default_noise if noise is None else noise)
        n = _check_num(num, "pairs", split)
        groups = self._groups(split, "pairs", n, 2, seed)
        label_rng = self._rng(split, "pair_labels", seed)
        out = []
        for p, (a, b), (ga, gb) in groups:
            ranks = plackett_luce_ranks([ga, gb], noise, label_rng)
            (c, gc), (r, gr) = ((a, ga), (b, gb)) if ranks[0] == 0 else ((b, gb), (a, ga))
            rec: dict[str, Any] = {"prompt": self._text(p), "chosen": self._response_text(c),
                                   "rejected": self._response_text(r)}
            if with_gold:
                rec["chosen_gold"], rec["rejected_gold"] = gc, gr
            out.append(rec)
        return out

    def ranking_records(self, split: str, k: int = 4, noise: float | None = None, *,
                        num: int | None = None, seed: int = 0, with_gold: bool = False
                        ) -> list[dict[str, Any]]:
        """``{"prompt", "responses", "ranks"}`` K-wise rankings (``ranks[i]`` = 0 for the best).

        Ranks are sampled by Plackett–Luce on ``gold / noise`` (``noise`` as in
        :meth:`preference_records`). ``with_gold=True`` adds a ``golds`` list.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
            raise ValueError(f"ranking_records: k must be an integer ≥ 2, got {k!r}")
        noise = _check_noise(self.default_noise if noise is None else noise)
        n = _check_num(num, "rankings", split)
        groups = self._groups(split, "rankings", n, int(k), seed)
        label_rng = self._rng(split, "ranking_labels", seed)
        out = []
        for p, rs, gs in groups:
            rec: dict[str, Any] = {"prompt": self._text(p),
                                   "responses": [self._response_text(r) for r in rs],
                                   "ranks": plackett_luce_ranks(gs, noise, label_rng)}
            if with_gold:
                rec["golds"] = list(gs)
            out.append(rec)
        return out

    def prompt_records(self, split: str, *, num: int | None = None, seed: int = 0
                       ) -> list[dict[str, str]]:
        """``{"prompt"}`` records for RL rollouts and evaluation."""
        n = _check_num(num, "prompts", split)
        rng = self._rng(split, "prompts", seed)
        return [{"prompt": self._text(self._sample_prompt(rng))} for _ in range(n)]

    def __repr__(self) -> str:
        return f"Task({self.name!r}, vocab={self.vocab_size}, prompt≤{self.prompt_length}, " \
               f"response≤{self.response_length})"
