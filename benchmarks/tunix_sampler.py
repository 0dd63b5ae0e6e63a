"""Runs INSIDE Tunix's own venv (see ``tunix_env.py``): times Tunix's vanilla sampler.

Usage (the suite calls it; by hand only for debugging)::

    benchmarks/.venv-tunix/bin/python benchmarks/tunix_sampler.py SPEC.json PROMPTS.npy

SPEC.json: ``{"shape": <HF llama config dict>, "new_tokens": N, "reps": R}``; PROMPTS.npy: int32
``[B, P]`` prompt ids (no padding). Builds ``tunix.models.llama3.model.Llama3`` with random weights
at the shape, a ``tunix.generate.sampler.Sampler`` with a KV cache of ``P + N`` slots, and times
greedy sampling (``temperature=0``) of N new tokens for the B prompts. No stop token can fire
(``eos_tokens=[-1]``), so every row runs to full length, as on our side. Prints one line
``TUNIX_RESULT {json}`` with the per-call seconds (the first call, compilation included, apart).

Imports nothing from rlhf_jax or benchmarks: it runs under another interpreter.
"""
from __future__ import annotations

import json
import statistics
import sys
import time


class IdTokenizer:
    """Text is the ids written in decimal, space-separated; bos_id 0 is falsy, so Tunix adds no BOS."""

    def __init__(self, pad_id: int, eos_id: int):
        self._pad, self._eos = pad_id, eos_id

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def main(spec_path: str, prompts_path: str) -> None:
    import jax
    import numpy as np
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama3

    spec = json.load(open(spec_path))
    shape, new_tokens, reps = spec["shape"], int(spec["new_tokens"]), int(spec["reps"])
    if shape["model_type"] != "llama":
        raise ValueError(f"{spec_path}: the Tunix side needs a llama shape, got model_type={shape['model_type']!r}")
    prompts = np.load(prompts_path)
    batch, plen = prompts.shape
    cfg = llama3.ModelConfig(
        num_layers=shape["num_hidden_layers"],
        vocab_size=shape["vocab_size"],
        embed_dim=shape["hidden_size"],
        hidden_dim=shape["intermediate_size"],
        num_heads=shape["num_attention_heads"],
        head_dim=shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"],
        num_kv_heads=shape.get("num_key_value_heads", shape["num_attention_heads"]),
        rope_theta=int(shape["rope_theta"]),
        norm_eps=shape["rms_norm_eps"],
        weight_tying=bool(shape.get("tie_word_embeddings", False)),
    )
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
    cache = sampler_lib.CacheConfig(
        cache_size=plen + new_tokens, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
    )
    sampler = sampler_lib.Sampler(
        transformer=model, tokenizer=IdTokenizer(shape["pad_token_id"], shape["eos_token_id"]), cache_config=cache
    )
    texts = [" ".join(str(int(t)) for t in row) for row in prompts]

    def call():
        out = sampler(texts, max_generation_steps=new_tokens, max_prompt_length=plen, temperature=0.0,
                      eos_tokens=[-1], echo=False)
        return out

    t = time.perf_counter()
    out = call()
    first = time.perf_counter() - t
    lengths = [len(x) for x in out.tokens]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = call()
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t)
    result = {
        "median_s": statistics.median(times),
        "best_s": min(times),
        "times_s": times,
        "first_call_s": first,
        "generated_lengths": sorted(set(lengths)),
        "batch": batch,
        "prompt_len": plen,
        "new_tokens": new_tokens,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }
    print("TUNIX_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json PROMPTS.npy")
    main(sys.argv[1], sys.argv[2])
