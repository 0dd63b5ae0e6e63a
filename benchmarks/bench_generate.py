"""Generation benchmark: rlhf_jax ``generate`` vs transformers ``generate`` (PyTorch CPU), same weights.

    .venv/bin/python -m benchmarks.bench_generate                  # tiny and gpt2, batch 16, prompt 64, 128 new
    .venv/bin/python -m benchmarks.bench_generate --shapes tiny --reps 2

For each shape: random weights are made once in transformers, saved as safetensors and loaded by
``rlhf_jax.models.from_pretrained`` (identical weights on both sides). Both sides generate
``new_tokens`` tokens for ``batch`` full-length prompts with no stop token (every row runs to full
length), greedy and sampling (temperature 1, no top-k/top-p: the setting of TRL's PPO rollouts), in
one process, back to back, each item preceded by a short matmul probe (the machine is shared: the
probe shows how loaded it was). Compilation/warm-up is excluded (ours: one full untimed call;
transformers: an untimed 2-token call); the median of ``reps`` runs is reported as
new tokens/s = batch · new_tokens / seconds.

Hardware floor of one decode step: every weight is read once per step (the input embedding table
only as the gathered rows) plus the keys/values of the tokens already in the cache (average over
the run: prompt + new/2 slots), divided by the measured copy bandwidth (best of a numpy copy and a
jitted elementwise pass over 256 MiB, read + write bytes counted). Our decode-step time is
``(t(N new tokens) - t(1 new token)) / (N - 1)`` (prefill cancels out).

"Matmuls alone" (CPU): the step's weight matmuls (every projection and the LM head, same shapes,
batch rows) timed by themselves, each product feeding the next, in XLA under the decode program's
compiler options, in eager PyTorch, and (for reference) in numpy's BLAS. A decode step cannot beat
its own matmuls, so when they alone exceed 2x the bandwidth floor, that target is out of reach of
the matmul library on this machine.

``run(...)`` is the entry point of the benchmark suite (``benchmarks/run.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from benchmarks import probes, timing
from benchmarks import shapes as shape_table

TARGETS = {"tiny": 3.0, "gpt2": 1.5}


def _log(msg: str) -> None:
    print(f"[bench_generate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
MODES = ("greedy", "sampling")


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def measure_copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Bytes/s (read + write) of the faster of a numpy copy and a jitted elementwise pass."""
    return max(probes.numpy_copy_bandwidth(nbytes, min_time=0.3), probes.jax_copy_bandwidth(nbytes, min_time=0.3))


def decode_bytes_per_step(config, batch: int, prompt_len: int, new_tokens: int, param_bytes: int) -> dict:
    """Bytes a decode step must read: weights (input embeddings: only ``batch`` rows) + average KV cache."""
    itemsize = np.dtype(config.dtype).itemsize
    embed = config.vocab_size * config.hidden_size * np.dtype(config.param_dtype).itemsize
    weights = param_bytes - (0 if config.tie_word_embeddings else embed)  # tied: the LM head reads it all
    weights += batch * config.hidden_size * itemsize
    avg_ctx = prompt_len + new_tokens / 2
    kv = 2 * config.num_layers * batch * avg_ctx * config.num_kv_heads * config.head_dim * itemsize
    return {"weight_bytes": int(weights), "kv_bytes_avg": int(kv), "bytes_per_step": int(weights + kv)}


def decode_matmul_shapes(config) -> list[tuple[int, int]]:
    """``(K, N)`` of every weight matmul of one decode step (per layer, then the LM head)."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = [(d, q), (d, kv), (d, kv), (q, d)] + ([(d, f)] if config.gated_mlp else []) + [(d, f), (f, d)]
    return layer * config.num_layers + [(d, config.vocab_size)]


def matmul_step_seconds(shapes: Sequence[tuple[int, int]], batch: int, *, side: str, reps: int = 5,
                        chained: bool = True) -> float:
    """Best-of-``reps`` seconds of the matmuls ``[batch, K] @ [K, N]`` of one decode step, alone.

    Same weight bytes as the model, row-major f32, one call each (``side="jax"``: a jitted loop of
    4 steps under the decode program's CPU compiler options, per step; ``"torch"``: eager
    ``torch.matmul``, one after the other). ``chained``: each product is the next one's input, as
    in a layer stack; otherwise XLA may run independent products concurrently (a lower bound). What
    the matmul library reaches at this batch on this machine: a decode step cannot be faster than
    its own matmuls. ``side="numpy"``: numpy's BLAS, for reference (no decode uses it).
    """
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((k, n), dtype=np.float32) * 0.02) for k, n in shapes]
    widths = sorted({k for k, _ in shapes})
    if side == "numpy":  # numpy's bundled BLAS (OpenBLAS in the PyPI wheels), one product after another
        xs = {k: np.ones((batch, k), np.float32) for k in widths}
        return timing.time_calls(lambda: [np.matmul(xs[w.shape[0]], w) for w in weights], reps=reps).best
    if side == "torch":
        import torch

        ws = [torch.from_numpy(w) for w in weights]
        xs = {k: torch.ones(batch, k) for k in widths}
        with torch.no_grad():
            return timing.time_calls(lambda: [torch.matmul(xs[w.shape[0]], w) for w in ws], reps=reps).best
    import jax
    import jax.numpy as jnp

    from rlhf_jax.generation.engine import decode_compiler_options

    steps = 4

    def body(_, x):
        if chained:
            h = x
            for w in ws_j:
                k = w.shape[0]
                h = (h[:, :k] if h.shape[1] >= k else jnp.tile(h, (1, -(-k // h.shape[1])))[:, :k]) @ w
            return x + 1e-12 * jnp.sum(h)
        acc = jnp.zeros((), jnp.float32)
        for w in ws_j:  # each product feeds the next step's input, so none is hoisted or dropped
            acc = acc + jnp.sum((x[:, :w.shape[0]] @ w)[:, :1])
        return x + acc * 1e-12

    ws_j = [jnp.asarray(w) for w in weights]
    fn = jax.jit(lambda x, _ws: jax.lax.fori_loop(0, steps, body, x), compiler_options=decode_compiler_options())
    x = jnp.ones((batch, max(widths)), jnp.float32)
    return timing.time_calls(lambda: fn(x, ws_j), reps=reps, sync=jax.block_until_ready).best / steps


def bench_shape(
    shape: dict[str, Any],
    *,
    name: str = "",
    batch: int = 16,
    prompt_len: int = 64,
    new_tokens: int = 128,
    reps: int = 3,
    dtype: str = "float32",
    param_dtype: str = "float32",
    with_peer: bool = True,
    copy_bandwidth_bytes_per_s: float | None = None,
    seed: int = 0,
    modes: Sequence[str] = MODES,
    decode_step: bool = True,
    attention_impl: str = "xla",
) -> dict[str, Any]:
    """Ours vs transformers on one HF config dict; returns ``{"modes": {mode: {...}}, ...}``.

    ``dtype``: our compute dtype; ``param_dtype``: the dtype our weights are stored in (what a
    user sets as ``param_dtype``; "bfloat16" halves the bytes every decode step reads). With a peer
    the weights are transformers' random float32 ones, loaded by ``from_pretrained``; without one
    (accelerators) ``rlhf_jax.models.init_params`` makes them directly (no PyTorch needed).
    ``modes``: a subset of ``MODES``. ``decode_step``: also time a 1-token call and report the decode
    step against the bandwidth floor (needs "greedy" in ``modes``). ``attention_impl``: our
    ``ModelConfig.attention_impl`` (the prefill's full-sequence forward; the decode steps read the cache).
    """
    import jax
    import jax.numpy as jnp

    from rlhf_jax.generation import generate
    from rlhf_jax.models import CausalLM, ModelConfig, count_params, from_pretrained, init_params

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"bench_shape: modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    if decode_step and "greedy" not in modes:
        raise ValueError("bench_shape: decode_step=True times the greedy call; add 'greedy' to modes")
    if with_peer:
        import torch
        import transformers

        hf_cfg = transformers.AutoConfig.for_model(**shape)
        torch.manual_seed(seed)
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp, safe_serialization=True)
            model, params = from_pretrained(tmp, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                            attention_impl=attention_impl)
    else:
        model = CausalLM(ModelConfig.from_hf(shape, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl))
        params = init_params(model, jax.random.PRNGKey(seed))
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    result: dict[str, Any] = {"shape": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                              "dtype": dtype, "param_dtype": param_dtype, "reps": reps, "modes": {}}

    def ours(mode: str, n: int, key):
        out = generate(model, params, ids_j, mask_j, rng=key, max_new_tokens=n, greedy=mode == "greedy",
                       temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(), pad_token_id=0)
        return jax.block_until_ready(out)

    def peer(mode: str, n: int = new_tokens):
        gen_cfg = transformers.GenerationConfig(
            max_new_tokens=n, do_sample=mode == "sampling", temperature=1.0, top_k=0, top_p=1.0,
            eos_token_id=None, pad_token_id=0, bos_token_id=None,
        )
        with torch.no_grad():
            return hf_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                     attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                     generation_config=gen_cfg)

    greedy_tokens = {}
    for mode in modes:
        row: dict[str, Any] = {}
        row["probe_gflops_ours"] = probes.quick_probe(jax.default_backend()) / 1e9
        t0 = time.perf_counter()
        out = ours(mode, new_tokens, jax.random.key(0))  # compile + first run
        row["ours_compile_and_first_s"] = time.perf_counter() - t0
        _log(f"{name} {mode}: ours compiled + first run in {row['ours_compile_and_first_s']:.1f}s")
        assert out.tokens.shape == (batch, new_tokens) and int(out.mask.sum()) == batch * new_tokens
        keys = iter(range(1, 10_000))
        sec, times = _median_time(lambda: ours(mode, new_tokens, jax.random.key(next(keys))), reps)
        row.update(ours_s=sec, ours_times_s=times, ours_tokens_per_s=batch * new_tokens / sec)
        _log(f"{name} {mode}: ours {sec:.2f}s per call")
        if mode == "greedy":
            greedy_tokens["ours"] = np.asarray(out.tokens)
        if with_peer:
            row["probe_gflops_peer"] = probes.quick_probe("cpu") / 1e9
            peer(mode, 2)  # warm-up (allocator, threads); PyTorch has nothing to compile
            outs = []
            sec, times = _median_time(lambda: outs.append(peer(mode)), reps)
            assert tuple(outs[0].shape) == (batch, prompt_len + new_tokens), tuple(outs[0].shape)
            if mode == "greedy":
                greedy_tokens["peer"] = outs[0][:, prompt_len:].numpy()
            _log(f"{name} {mode}: transformers {sec:.2f}s per call")
            row.update(peer_s=sec, peer_times_s=times, peer_tokens_per_s=batch * new_tokens / sec,
                       speedup=row["ours_tokens_per_s"] * sec / (batch * new_tokens))
            row["target"] = TARGETS.get(name)
        result["modes"][mode] = row
    if "peer" in greedy_tokens:
        # informative: random-init logits are nearly flat, so f32 rounding can flip an argmax and the
        # two greedy paths then diverge for the rest of the row
        agree = np.cumprod(greedy_tokens["ours"] == greedy_tokens["peer"], axis=1)
        result["greedy_prefix_agreement"] = float(agree.mean())

    if not decode_step:
        result.update(params=count_params(params))
        return result
    # decode step vs the bandwidth floor
    sec_one, _ = _median_time(lambda: ours("greedy", 1, jax.random.key(0)), 1)  # compile
    sec_one, _ = _median_time(lambda: ours("greedy", 1, jax.random.key(0)), max(reps, 3))
    step_s = (result["modes"]["greedy"]["ours_s"] - sec_one) / (new_tokens - 1)
    bw = copy_bandwidth_bytes_per_s or measure_copy_bandwidth()
    param_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    need = decode_bytes_per_step(model.config, batch, prompt_len, new_tokens, param_bytes)
    floor_s = need["bytes_per_step"] / bw
    result.update(need, params=count_params(params), copy_bandwidth_bytes_per_s=bw, prefill_s=sec_one,
                  decode_step_s=step_s, floor_step_s=floor_s, step_over_floor=step_s / floor_s)
    if jax.default_backend() == "cpu":  # what the matmul libraries reach at this batch, alone
        mm = decode_matmul_shapes(model.config)
        result["matmul_step_s_ours"] = matmul_step_seconds(mm, batch, side="jax")
        result["matmul_step_s_ours_unchained"] = matmul_step_seconds(mm, batch, side="jax", chained=False)
        result["matmul_step_s_torch"] = matmul_step_seconds(mm, batch, side="torch")
        result["matmul_step_s_numpy"] = matmul_step_seconds(mm, batch, side="numpy")
        _log(f"{name}: decode step {step_s * 1e3:.2f} ms; its weight matmuls alone, one after the other: XLA "
             f"{result['matmul_step_s_ours'] * 1e3:.2f} ms (independent, concurrent: "
             f"{result['matmul_step_s_ours_unchained'] * 1e3:.2f} ms), PyTorch {result['matmul_step_s_torch'] * 1e3:.2f} ms, "
             f"numpy/OpenBLAS {result['matmul_step_s_numpy'] * 1e3:.2f} ms; "
             f"bandwidth floor {floor_s * 1e3:.2f} ms")
    return result


def run(
    shapes: Sequence[str] | None = None,
    quick: bool = False,
    *,
    shape: dict[str, Any] | None = None,
    batch: int = 16,
    prompt_len: int = 64,
    new_tokens: int = 128,
    reps: int | None = None,
    dtype: str = "float32",
    with_peer: bool = True,
    copy_bandwidth: float | None = None,
    hbm_bytes_per_s: float | None = None,
    param_dtype: str = "float32",
    modes: Sequence[str] = MODES,
    decode_step: bool = True,
    attention_impl: str = "xla",
    **kwargs: Any,
):
    """Benchmark entry point.

    ``run(shapes=("tiny", "gpt2"), quick=False) -> list[dict]``: one flat row per (shape, mode)
    with ``ours_tokens_per_s``, ``peer_tokens_per_s``, ``speedup``, ``target``, ``decode_step_s``,
    ``floor_step_s``, ``step_over_floor`` and the probes. ``quick``: tiny only, 1 rep.

    ``run(shape=<HF config dict>, batch=..., ...) -> dict``: the full result of that one shape
    (``{"modes": {"greedy": {...}, "sampling": {...}}, ...}``), as ``benchmarks/run.py`` calls it.
    ``hbm_bytes_per_s`` (accelerators) replaces the measured copy bandwidth in the floor.
    ``param_dtype``, ``modes``, ``decode_step``, ``attention_impl``: as in :func:`bench_shape`.
    """
    if kwargs:
        raise TypeError(f"bench_generate.run: unexpected arguments {sorted(kwargs)}")
    bw = hbm_bytes_per_s or copy_bandwidth or None
    if shape is not None:
        return bench_shape(shape, name=str(shape.get("name", shape.get("model_type", ""))), batch=batch,
                           prompt_len=prompt_len, new_tokens=new_tokens, reps=reps or (1 if quick else 3),
                           dtype=dtype, param_dtype=param_dtype, with_peer=with_peer, copy_bandwidth_bytes_per_s=bw,
                           modes=modes, decode_step=decode_step, attention_impl=attention_impl)
    names = list(shapes or (("tiny",) if quick else ("tiny", "gpt2")))
    bw = bw or measure_copy_bandwidth()
    rows = []
    for name in names:
        res = bench_shape(shape_table.get_shape(name), name=name, batch=batch, prompt_len=prompt_len,
                          new_tokens=new_tokens, reps=reps or (1 if quick else 3), dtype=dtype,
                          param_dtype=param_dtype, with_peer=with_peer, copy_bandwidth_bytes_per_s=bw, modes=modes,
                          decode_step=decode_step, attention_impl=attention_impl)
        for mode, r in res["modes"].items():
            flat = {k: v for k, v in res.items() if k != "modes"}
            flat.update(mode=mode, **r)
            rows.append(flat)
    return rows


def _ms_list(*seconds: float | None) -> str:
    return "-" if any(x is None for x in seconds) else " / ".join(f"{x * 1e3:.2f}" for x in seconds)


def format_rows(rows: list[dict]) -> str:
    head = ("| shape | mode | ours tok/s | transformers tok/s | ratio | target | decode step ms | floor ms | "
            "step/floor | matmuls alone ms, XLA / PyTorch / numpy | probe GFLOP/s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peer = r.get("peer_tokens_per_s")
        peer_s = "-" if peer is None else f"{peer:.0f}"
        ratio_s = "-" if peer is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['ours_tokens_per_s']:.0f} | {peer_s} | {ratio_s} | "
            f"{r.get('target') or '-'} | {r['decode_step_s'] * 1e3:.2f} | {r['floor_step_s'] * 1e3:.2f} | "
            f"{r['step_over_floor']:.2f} | "
            f"{_ms_list(r.get('matmul_step_s_ours'), r.get('matmul_step_s_torch'), r.get('matmul_step_s_numpy'))} | "
            f"{r['probe_gflops_ours']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.shapes.split(","), args.quick, batch=args.batch, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, reps=args.reps, with_peer=not args.no_peer)
    print(format_rows(rows))
    bw = rows[0]["copy_bandwidth_bytes_per_s"]
    print(f"\ncopy bandwidth {bw / 1e9:.1f} GB/s (read+write), load average {os.getloadavg()[0]:.1f}, "
          f"cpus {os.cpu_count()}, {time.perf_counter() - t0:.0f}s total")
    for r in rows:
        if r["mode"] == "greedy" and "greedy_prefix_agreement" in r:
            print(f"{r['shape']}: greedy tokens equal to transformers' on {100 * r['greedy_prefix_agreement']:.0f}% "
                  f"of positions (prefix agreement; random-init logits are near ties)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
