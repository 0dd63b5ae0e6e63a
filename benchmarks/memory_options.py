"""What each memory option saves, from the compiled program's own memory analysis (no run, no timing).

    python -m benchmarks.memory_options                 # a ~100M-parameter Llama shape, vocab 32k (CPU: a minute)
    python -m benchmarks.memory_options --shape small   # the shape the test suite checks

The program is one policy update of the RL core's shape: the policy forward over prompt + response
(``rl.experience.policy_forward``: hidden states, then the LM head on the N response positions),
log-probs, a loss, the gradient and the AdamW step (``training.make_optimizer``), compiled for one
device with the state donated. Each row changes one option from the f32 baseline (``all`` combines
them) and prints XLA's ``memory_analysis()`` of the compiled program: ``argument_bytes`` (params +
optimiser state + batch), ``temp_bytes`` (activations, logits and other scratch live at the peak) and
their sum. The options:

    logits_chunk   ModelConfig.logits_chunk: [B, c, V] logits per chunk instead of [B, N, V]
    remat_full     ModelConfig.remat (policy "full"): each layer recomputed in the backward pass
    remat_dots     remat with policy "dots_saveable": the matmul outputs kept
    state_bf16     OptimConfig.state_dtype="bfloat16": Adam's moments in bf16
    params_bf16    param_dtype="bfloat16" (and bf16 compute): the weights stored in bf16
    lora_r8        LoRA rank 8 on q/k/v/o + gate/up/down: the base frozen, optimiser state for adapters only
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.rl.experience import policy_forward
from rlhf_jax.training.optim import OptimConfig, make_optimizer
from rlhf_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: dict
    batch: int
    prompt: int
    response: int
    chunk: int


SMALL = Shape("small", dict(vocab_size=4096, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                            intermediate_size=512, max_position_embeddings=128), batch=16, prompt=16, response=64,
              chunk=8)
MEDIUM = Shape("medium", dict(vocab_size=32000, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4,
                              head_dim=64, intermediate_size=2048, max_position_embeddings=512), batch=8, prompt=64,
               response=128, chunk=16)
SHAPES = {"small": SMALL, "medium": MEDIUM}

OPTIONS = {
    "baseline": {},
    "logits_chunk": {"logits_chunk": True},
    "remat_full": {"remat": "full"},
    "remat_dots": {"remat": "dots_saveable"},
    "state_bf16": {"state_dtype": "bfloat16"},
    "params_bf16": {"param_dtype": "bfloat16"},
    "lora_r8": {"lora": 8},
    "all": {"logits_chunk": True, "remat": "full", "state_dtype": "bfloat16", "param_dtype": "bfloat16", "lora": 8},
}


def _program(shape: Shape, opts: dict):
    """(jitted step, abstract state, abstract batch) of one policy update with the options ``opts``."""
    cfg = models.tiny_config(arch="llama", **shape.model)
    if opts.get("param_dtype"):
        cfg = cfg.replace(param_dtype=opts["param_dtype"], dtype=opts["param_dtype"])
    if opts.get("remat"):
        cfg = cfg.replace(remat=True, remat_policy=opts["remat"])
    if opts.get("logits_chunk"):
        cfg = cfg.replace(logits_chunk=shape.chunk)
    model = models.CausalLM(cfg)

    def init():
        params = models.init_params(model, jax.random.PRNGKey(0))
        if opts.get("lora"):
            lcfg = lora.LoraConfig(rank=opts["lora"])
            params = {"params": params["params"], "lora": lora.init_adapters(params, lcfg, jax.random.PRNGKey(1))}
        return params

    params = jax.eval_shape(init)
    net = lora.wrap(model, lora.LoraConfig(rank=opts["lora"])) if opts.get("lora") else model
    tx = make_optimizer(OptimConfig(learning_rate=1e-5, state_dtype=opts.get("state_dtype", "float32")), params,
                        total_steps=10)
    state = jax.eval_shape(lambda p: TrainState.create(apply_fn=net.apply, params=p, tx=tx), params)
    b, p, n = shape.batch, shape.prompt, shape.response
    batch = tuple(jax.ShapeDtypeStruct((b, t), jnp.int32) for t in (p, p, n, n))

    def step(st, batch):
        def loss(prm):
            out = policy_forward(net, prm, *batch, jnp.float32(1.0))
            return -jnp.sum(out["logp"]) / (b * n)
        return st.apply_gradients(jax.grad(loss)(st.params))

    return jax.jit(step, donate_argnums=0), state, batch


def measure(shape: Shape, options=None) -> list[dict]:
    """One row per option: the compiled program's argument, output and temp bytes."""
    rows = []
    for name in options or OPTIONS:
        fn, state, batch = _program(shape, OPTIONS[name])
        ma = fn.lower(state, batch).compile().memory_analysis()
        arg, temp = int(ma.argument_size_in_bytes), int(ma.temp_size_in_bytes)
        rows.append({"option": name, "argument_bytes": arg, "temp_bytes": temp, "output_bytes":
                     int(ma.output_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes), "total_bytes": arg + temp})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    rows = measure(shape)
    base = rows[0]
    print(f"shape {shape.name}: {shape.model}, batch {shape.batch}, prompt {shape.prompt}, response {shape.response}, "
          f"logits chunk {shape.chunk}; device {jax.devices()[0].platform}")
    print(f"{'option':<14}{'argument MiB':>14}{'temp MiB':>12}{'total MiB':>12}{'total / baseline':>18}")
    mib = 2 ** 20
    for r in rows:
        print(f"{r['option']:<14}{r['argument_bytes'] / mib:>14.1f}{r['temp_bytes'] / mib:>12.1f}"
              f"{r['total_bytes'] / mib:>12.1f}{r['total_bytes'] / base['total_bytes']:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
