"""Does ``attention_impl="auto"`` compute what ``"xla"`` computes on this device? The accelerator script's gate.

    python -m benchmarks.attention_check          # exit 0: same loss and gradients up to bf16 rounding

``benchmarks/gpu_check.sh`` runs it before the benchmark: on a GPU "auto" is cuDNN's fused kernel
(``jax.nn.dot_product_attention``), which the CPU test suite cannot run (``tests/test_attention_impl.py``
checks the blocked implementation against "xla" in f32 on CPU; cuDNN's kernel takes bf16/f16 only). A
small Llama with the 1B shape's head layout (head dim 64, 2 query heads per key/value head), bf16
compute and f32 params, T = 128 tokens, one row left-padded and one right-padded: the loss and the
gradient of every parameter under "auto" against "xla". Exit 1 (the script then benchmarks with
``--attention-impl xla``, so one broken kernel costs one row, not the run) when "auto" raises or the
two differ by more than bf16 rounding: loss relative difference > ``LOSS_RTOL`` or the gradients'
relative distance ``|g_auto - g_xla| / |g_xla|`` (over all leaves) > ``GRAD_RTOL``.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import numpy as np

LOSS_RTOL = 1e-2
GRAD_RTOL = 5e-2
SEQ_LEN = 128


def _loss_and_grads(impl: str, ids, mask):
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models import CausalLM, init_params, tiny_config

    cfg = tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
                      vocab_size=512, max_position_embeddings=SEQ_LEN, dtype="bfloat16", attention_impl=impl)
    model = CausalLM(cfg)
    params = init_params(model, jax.random.key(0))

    def loss(p):
        logits = model.apply(p, ids, mask)[:, :-1].astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, 1:, None], axis=-1)[..., 0]
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(nll * m) / jnp.sum(m)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)], cfg


def check() -> dict:
    """Loss and gradients of "auto" against "xla"; ``ok`` says whether they agree within the tolerances."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.transformer import resolve_attention_impl

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 512, size=(2, SEQ_LEN)).astype(np.int32))
    mask = np.ones((2, SEQ_LEN), np.int32)
    mask[0, :11] = 0  # left-padded row
    mask[1, SEQ_LEN - 17:] = 0  # right-padded row
    mask = jnp.asarray(mask)
    loss_x, grads_x, _ = _loss_and_grads("xla", ids, mask)
    loss_a, grads_a, cfg = _loss_and_grads("auto", ids, mask)
    diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(grads_a, grads_x)))
    norm = np.sqrt(sum(float(np.sum(b ** 2)) for b in grads_x))
    out = {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
           "auto_resolves_to": resolve_attention_impl(cfg, SEQ_LEN), "loss_xla": loss_x, "loss_auto": loss_a,
           "loss_rel_diff": abs(loss_a - loss_x) / abs(loss_x), "grad_rel_dist": diff / norm}
    out["ok"] = bool(np.isfinite(loss_a) and out["loss_rel_diff"] <= LOSS_RTOL and out["grad_rel_dist"] <= GRAD_RTOL)
    return out


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.attention_check",
                            description=__doc__.split("\n")[0]).parse_args(argv)
    try:
        r = check()
    except Exception:  # the gate's answer is "no": say why, and let the script fall back to xla
        traceback.print_exc()
        print("attention check: attention_impl='auto' raised (above)")
        return 1
    print(f"attention check on {r['device']}: auto = {r['auto_resolves_to']}; loss {r['loss_auto']:.6g} vs xla "
          f"{r['loss_xla']:.6g} (relative difference {r['loss_rel_diff']:.2g}, tolerance {LOSS_RTOL:g}); gradients' "
          f"relative distance {r['grad_rel_dist']:.2g} (tolerance {GRAD_RTOL:g}): {'ok' if r['ok'] else 'MISMATCH'}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
