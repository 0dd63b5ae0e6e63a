"""Where a compiled step spends its time: a ``jax.profiler`` trace folded onto the HLO's op names.

    .venv/bin/python -m benchmarks.profile sft --shape tiny            # SFT step, 8 x 512
    .venv/bin/python -m benchmarks.profile decode --shape tiny          # one generate call, 16 x 64 + 128
    .venv/bin/python -m benchmarks.profile ppo --depth 5                # one PPO iteration (tiny)
    .venv/bin/python -m benchmarks.profile sft --hlo /tmp/sft.hlo       # also write the compiled HLO

The program is compiled and run once untimed, then timed (``--reps``), then run once under
``jax.profiler.trace``. Every executed HLO instruction (on CPU: one thunk) is looked up in the
compiled HLO text, and its time is added to the first ``--depth`` components of its
``metadata.op_name`` (the JAX source path: ``jit(sft_step)/transpose(jvp(CausalLM))/model/...``),
so the table reads as "which part of the model, forward or backward, costs what". Times are
summed over threads: where two instructions run concurrently the total exceeds the wall time.
This is how the figures in ``benchmarks/README.md`` ("Profiles") were found.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from benchmarks import data
from benchmarks import shapes as shape_table


def fold_trace(trace_dir: str, hlo_text: str, depth: int) -> tuple[collections.Counter, float]:
    """``(microseconds by op_name prefix, total attributed microseconds)`` of the trace in ``trace_dir``."""
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no perfetto trace")
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    op_name = {m.group(1): m.group(2)
               for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo_text)}
    by_prefix: collections.Counter = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in op_name:
            continue
        key = "/".join(op_name[e["name"]].split("/")[:depth])
        by_prefix[key] += e.get("dur", 0)
        total += e.get("dur", 0)
    return by_prefix, total


def profile(fn: Callable, args: tuple, *, depth: int, reps: int, top: int, hlo_path: str | None = None) -> dict:
    """Time ``fn(*args)`` (already jitted) and fold one traced call onto its HLO op names."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    hlo = fn.lower(*args).compile().as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        by_prefix, total = fold_trace(d, hlo, depth)
    return {"first_call_s": first, "median_s": float(np.median(times)), "times_s": times,
            "attributed_s": total / 1e6, "top": [(k, v / 1e6) for k, v in by_prefix.most_common(top)]}


def _sft(shape, wl, dtype, attention_impl):
    import jax
    import jax.numpy as jnp

    from benchmarks import jax_side
    from rlhf_jax.training import SFTStepConfig, sft_step

    batch = data.sft_batch(shape["vocab_size"], wl.sft_batch, wl.sft_seq)
    module, params = jax_side.build(shape, dtype=dtype, attention_impl=attention_impl)
    state = jax_side._train_state(module, params)
    step = jax.jit(functools.partial(sft_step, cfg=SFTStepConfig()))
    dev = {k: jnp.asarray(batch[k]) for k in ("input_ids", "targets", "loss_mask", "attention_mask")}
    return step, (state, dev)


def _decode(shape, wl, dtype, attention_impl):
    import jax
    import jax.numpy as jnp

    from benchmarks import jax_side
    from rlhf_jax.generation import engine

    module, params = jax_side.build(shape, dtype=dtype, attention_impl=attention_impl)
    p = data.prompts(shape["vocab_size"], wl.gen_batch, wl.gen_prompt)
    kw = dict(max_new_tokens=wl.gen_new, greedy=True, stop_token_ids=(), pad_token_id=shape["pad_token_id"])
    fn = jax.jit(functools.partial(engine.decode_program, module, **kw), compiler_options=engine.decode_compiler_options())
    args = (params, jnp.asarray(p["prompt_ids"]), jnp.asarray(p["prompt_mask"]), jax.random.key(0),
            jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    return fn, args


def _ppo(shape, wl, dtype, attention_impl):
    import jax
    import jax.numpy as jnp

    from benchmarks import jax_side
    from rlhf_jax import rl
    from rlhf_jax.rl import core

    p = data.prompts(shape["vocab_size"], wl.ppo_batch, wl.ppo_prompt)
    s = jax_side._ppo_setup(shape, wl.ppo_batch, response_length=wl.ppo_response, epochs=wl.ppo_epochs,
                            minibatches=wl.ppo_minibatches, dtype=dtype, attention_impl=attention_impl)
    state = rl.init_state(policy_model=s["policy_model"], policy_params=s["policy_params"],
                          policy_tx=s["policy_tx"], value_model=s["value_model"],
                          value_params=s["value_params"], value_tx=s["value_tx"], cfg=s["cfg"], rng=0)
    fn = jax.jit(lambda st, frozen, prompts, cfg: core.iteration_pure(st, frozen, prompts, None, cfg)[:2])
    return fn, (state, s["frozen"], {k: jnp.asarray(v) for k, v in p.items()}, core.traced(s["cfg"]))


def jax_side_default() -> str:
    from benchmarks import jax_side

    return jax_side.ATTENTION_IMPL


PROGRAMS: dict[str, Callable[..., tuple[Callable, tuple]]] = {"sft": _sft, "decode": _decode, "ppo": _ppo}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("program", choices=sorted(PROGRAMS))
    ap.add_argument("--shape", default="tiny", help="tiny, gpt2 or llama1b (benchmarks/shapes.py)")
    ap.add_argument("--workload", default="issue", help="benchmarks/shapes.py WORKLOADS (issue, micro)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-impl", default=jax_side_default(), help="ModelConfig.attention_impl (xla|blocked|cudnn|auto)")
    ap.add_argument("--depth", type=int, default=6, help="op_name components to group by")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hlo", default=None, help="write the compiled HLO text here")
    a = ap.parse_args(argv)
    shape = shape_table.get_shape(a.shape)
    wl = shape_table.get_workload(a.workload)
    fn, args = PROGRAMS[a.program](shape, wl, a.dtype, a.attention_impl)
    r = profile(fn, args, depth=a.depth, reps=a.reps, top=a.top, hlo_path=a.hlo)
    print(f"{a.program} / {a.shape}: first call {r['first_call_s']:.2f} s, median {r['median_s']:.3f} s "
          f"over {a.reps}; traced instruction time {r['attributed_s']:.3f} s (summed over threads)")
    for name, secs in r["top"]:
        print(f"  {secs * 1e3:10.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
