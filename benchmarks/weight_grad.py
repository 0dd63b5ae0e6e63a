"""The weight-gradient matmul on CPU: Eigen's transposed contraction against a copied-out ``x2ᵀ``.

    python -m benchmarks.weight_grad                    # the product grid (a minute or two)
    python -m benchmarks.weight_grad --steps tiny,gpt2  # also the SFT/RM steps, rule on vs off

A dense layer's weight gradient is ``dW = x2ᵀ·g2`` (``x2 [M, K]`` activations, ``g2 [M, N]`` output
gradient, the M = B·T tokens contracted). ``models.transformer.linear`` emits it with both operands'
row axis contracted; XLA:CPU runs that through Eigen. ``cpu_weight_grad_transposes_first(K, N)``
decides, for CPU only, to contract a materialised ``x2ᵀ`` instead (a plain row-major matmul).

The grid prints, for M = 4096 and each ``(K, N)``, the product's GFLOP/s both ways and what the rule
picks. ``--steps`` times the SFT step (and with ``rm``-prefixed names the reward-model step) of the
benchmark shapes as shipped and with the rule switched off (every product in Eigen's orientation),
alternating the two programs; the loss of the first call is printed for both (the same forward).
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import transformer

# (K, N): every N at K = 256, 768, 1024, then the short wide kernels (K >= 4N) of larger models
GRID = ([(k, n) for k in (256, 768, 1024) for n in (256, 768, 1024, 2048, 3072, 4096, 6144, 8192, 16384, 32000, 50257)]
        + [(2048, 256), (2048, 512), (3072, 768), (4096, 1024)])


def _median_seconds(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _products():
    dims = (((0,), (0,)), ((), ()))
    eigen = jax.jit(lambda x, g: jax.lax.dot_general(x, g, dims))
    copied = jax.jit(lambda x, g: jax.lax.dot_general(jax.lax.optimization_barrier(x.T), g, (((1,), (0,)), ((), ()))))
    return eigen, copied


def grid(m: int = 4096, shapes=GRID, reps: int = 3) -> list[dict]:
    eigen, copied = _products()
    rows = []
    for k, n in shapes:
        kx, kg = jax.random.split(jax.random.PRNGKey(k * 100003 + n))
        x = jax.random.normal(kx, (m, k))
        g = jax.random.normal(kg, (m, n))
        flop = 2.0 * m * k * n
        a, b = _median_seconds(eigen, x, g, reps=reps), _median_seconds(copied, x, g, reps=reps)
        rows.append({"m": m, "k": k, "n": n, "eigen_gflops": flop / a / 1e9, "copied_gflops": flop / b / 1e9,
                     "rule_copies": transformer.cpu_weight_grad_transposes_first(k, n)})
        print(f"K {k:5d}  N {n:6d}  Eigen {flop / a / 1e9:6.1f}  xT copied {flop / b / 1e9:6.1f} GFLOP/s"
              f"  rule: {'copy' if rows[-1]['rule_copies'] else 'Eigen'}", flush=True)
    return rows


def _step_program(kind: str, shape_name: str, batch_size: int, seq_len: int):
    from benchmarks import data, jax_side, shapes
    from rlhf_jax.training import RewardStepConfig, SFTStepConfig, reward_step, sft_step

    shape = shapes.get_shape(shape_name)
    if kind == "sft":
        batch = data.sft_batch(shape["vocab_size"], batch_size, seq_len)
        module, params = jax_side.build(shape, dtype="float32")
        step = functools.partial(sft_step, cfg=SFTStepConfig())
    else:
        batch = data.preference_batch(shape["vocab_size"], batch_size, seq_len)
        module, params = jax_side.build(shape, head="scalar", dtype="float32")
        step = functools.partial(reward_step, cfg=RewardStepConfig())
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = jax_side._train_state(module, params)
    return jax.jit(step, donate_argnums=(0,)), state, batch


def compare_step(kind: str, shape_name: str, reps: int = 4, batch_size: int = 8, seq_len: int = 512) -> dict:
    """Seconds per step with the rule as shipped (``on``) and switched off (``off``), calls alternating
    (the benchmark's batch: 8 sequences or preference pairs of 512 tokens); also the first losses."""
    rule = transformer.cpu_weight_grad_transposes_first
    programs = {}
    barriers = {}
    for name, fn in (("on", rule), ("off", lambda k, n: False)):
        transformer.cpu_weight_grad_transposes_first = fn  # read when the step is traced, below
        jax.clear_caches()  # the backward pass's traced branches are cached across programs otherwise
        try:
            step, state, batch = _step_program(kind, shape_name, batch_size, seq_len)
            lowered = step.lower(state, batch)
            barriers[name] = lowered.as_text().count("optimization_barrier")
            compiled = lowered.compile()
        finally:
            transformer.cpu_weight_grad_transposes_first = rule
        state, metrics = compiled(state, batch)
        programs[name] = [compiled, state, batch, float(metrics["loss"]), []]
    jax.clear_caches()
    if barriers["off"]:
        raise RuntimeError(f"the program with the rule off still copies x2ᵀ ({barriers['off']} barriers)")
    for _ in range(reps):
        for name, prog in programs.items():
            compiled, state, batch = prog[:3]
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            prog[4].append(time.perf_counter() - t0)
            prog[1] = state
    out = {name: float(np.median(p[4])) for name, p in programs.items()}
    out.update(loss_on=programs["on"][3], loss_off=programs["off"][3], copies_on=barriers["on"])
    print(f"{kind} step, {shape_name}: rule on {out['on']:.3f} s, off {out['off']:.3f} s "
          f"(on/off {out['on'] / out['off']:.3f}); {barriers['on']} products reoriented; "
          f"first loss {programs['on'][3]:.6f} / {programs['off'][3]:.6f}",
          flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="", help="comma-separated: tiny, gpt2, rm-tiny, rm-gpt2 (step timings)")
    ap.add_argument("--no-grid", action="store_true", help="skip the product grid")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")
    if not args.no_grid:
        grid()
    for item in filter(None, args.steps.split(",")):
        kind, shape_name = ("rm", item[3:]) if item.startswith("rm-") else ("sft", item)
        compare_step(kind, shape_name, reps=args.reps)


if __name__ == "__main__":
    main()
