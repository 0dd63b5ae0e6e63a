"""The decoder-only transformer (`CausalLM`), its trunk, and the KV cache.

Shapes: B batch, T new tokens, S key slots (T without a cache, the cache length with one),
D hidden, H query heads, K kv heads (H = K·G), Dh head dim, F MLP width, V vocab, L layers.

Attention (`ModelConfig.attention_impl`: a masked einsum by default, or query×key tiles with an online
softmax, or cuDNN's kernel; `attention`) lets query t attend to key s iff

    valid[b, s]  and  slot(s) <= slot(t)  and  seg[b, s] == seg[b, t]  and  slot(t) - slot(s) < window

with `valid` the attention mask (pads are never keys), `seg` the optional packed-segment ids and
`window` Mistral's sliding window (counted in slots, as transformers does). Rows with no allowed key
(pad queries) get a uniform distribution, never NaN; their outputs are meaningless by definition.

Parameter tree (names chosen so a training engineer can shard the large matrices on an `fsdp` axis;
every large kernel has the model dimension D first or last):

    model/embed/embedding [V, D]          model/pos_embed/embedding [P, D]  (gpt2)
    model/layers_i/attn_norm/{scale,bias} model/layers_i/mlp_norm/{scale,bias}
    model/layers_i/attn/{q,k,v}_proj/kernel [D, H|K, Dh]  (+ bias [H|K, Dh])
    model/layers_i/attn/o_proj/kernel [H, Dh, D]          (+ bias [D])
    model/layers_i/attn/{q,k}_norm/scale [Dh]             (qwen3)
    model/layers_i/mlp/{gate,up}_proj/kernel [D, F]       model/layers_i/mlp/down_proj/kernel [F, D]
    model/final_norm/{scale,bias}         lm_head/kernel [D, V]  (absent when embeddings are tied)
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError
from rlhf_jax.models.architecture import ModelConfig

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for incremental decoding (an immutable pytree).

    k, v:  tuples of L arrays [B, K, S, Dh]: per layer, keys (after RoPE / q-k norm) and values in
           the cache dtype. One buffer per layer lets decode update and read each in place.
    mask:  [B, S] int32      1 on slots holding a real token's key.
    index: int32 scalar      the next slot to write.
    """

    k: Array
    v: Array
    mask: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of `max_len` slots per row (all slots invalid, `index = 0`).

    `dtype` defaults to the config's compute dtype. The caller sizes `max_len` to hold the prompt
    plus every generated token: writes past the end are clamped by XLA, not detected.
    """
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch and max_len must be > 0, got batch={batch}, max_len={max_len}")
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        mask=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """`cache` with its slot axis extended to `max_len` (new slots empty and invalid; one copy).

    Lets a decode loop start with a cache sized to the prompt and grow it in segments, so the
    attention of early steps reads only the slots that can hold keys.
    """
    extra = max_len - cache.max_len
    if extra < 0:
        raise ValueError(f"grow_cache: max_len {max_len} is below the cache's {cache.max_len} slots")
    if extra == 0:
        return cache
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))  # noqa: E731
    return KVCache(k=tuple(pad(x) for x in cache.k), v=tuple(pad(x) for x in cache.v),
                   mask=jnp.pad(cache.mask, ((0, 0), (0, extra))), index=cache.index)


# ----------------------------------------------------------------------------------------------
# positions, masks, RoPE
# ----------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: Array) -> Array:
    """`max(cumsum(mask) - 1, 0)` `[B, T]` int32: each row counts from its first real token."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Array) -> Array:
    """Position of each token within its packed segment `[B, T]` int32 (0 at each segment start)."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], dtype=bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=segment_ids.ndim - 1)
    return idx - start


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[Dh/2]` float32, `theta^(-2i/Dh)`, with linear or llama3 scaling applied.

    llama3 (Meta's Llama 3.1 recipe): wavelengths `λ = 2π/f` longer than `L0/low` are divided by
    `factor`, shorter than `L0/high` are kept, and in between interpolated with
    `s = (L0/λ - low)/(high - low)`: `f' = (1-s) f/factor + s f`, where `L0` is
    `original_max_position_embeddings`.
    """
    dh = config.head_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))).astype(np.float32)
    rs = config.rope_scaling_dict
    if rs is None:
        return inv
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype == "default":
        return inv
    factor = float(rs["factor"])
    if rtype == "linear":
        return (inv / factor).astype(np.float32)
    # llama3
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old = float(rs["original_max_position_embeddings"])
    low_wl, high_wl = old / low, old / high
    wavelen = 2 * np.pi / inv
    out = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate `x [B, T, H, Dh]` by angle `pos · f_i` on the pairs `(x_i, x_{i+Dh/2})` (HF/NeoX layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# matmul with a hand-written backward pass
# ----------------------------------------------------------------------------------------------
def _dot_last_first(x: Array, w: Array, out_dtype) -> Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: Array, w: Array, out_dtype=None) -> Array:
    """`x [..., K] @ w [K, N] -> [..., N]` (in `out_dtype`, default x's dtype).

    Same forward as the plain einsum; the backward pass is written out so both gradient matmuls
    contract in the orientation that keeps the large operand in place: `dw = x2ᵀ·g2` is emitted
    with the activations as the left operand. JAX's own transpose rule emits `(g2ᵀ·x2)ᵀ`, and
    XLA:CPU then materialises `g2ᵀ` with a strided copy of the whole activation gradient before
    each weight-gradient matmul (measured: ~0.45 s of a 3.8 s tiny SFT step went to such copies,
    `benchmarks/README.md`). On CPU, some shapes copy out the small `x2ᵀ` instead
    (:func:`cpu_weight_grad_transposes_first`); other platforms get the plain product.
    """
    return _dot_last_first(x, w, out_dtype or x.dtype)


def _linear_fwd(x, w, out_dtype):
    return linear(x, w, out_dtype), (x, w)


def cpu_weight_grad_transposes_first(k: int, n: int) -> bool:
    """Whether, on CPU, the weight gradient `x2ᵀ·g2` of a `[K, N]` kernel contracts a materialised `x2ᵀ`.

    XLA:CPU runs the tokens-contracting `x2ᵀ·g2` (both operands' row axis contracted) through Eigen,
    which walks `g2` down its columns. Measured on this project's 2-core CPU at M = 4096 rows
    (`python -m benchmarks.weight_grad`; figures in `benchmarks/README.md`, "Second pass"):
    - a row stride of `g2` that is a multiple of 16 KiB (`N % 4096 == 0` in float32: the columns
      then share cache sets) runs at 70-80 GFLOP/s against 155-170 for the same product with `x2ᵀ`
      copied out first (a plain row-major matmul, which XLA:CPU hands to its YNNPACK kernels), at
      K = 256, 768 and 1024 and N = 4096, 8192 and 16384; at the other N measured (256 ... 3072, 6144,
      32000, 50257) the copy gains at most ~14% and loses up to ~35% (N = 50257), so Eigen is kept;
    - a short, wide kernel (`K >= 4·N`) with `N <= 256`: 1024 x 256 (the tiny benchmark model's MLP
      down projection) 78 -> 132 GFLOP/s, 2048 x 256 75 -> 102, and the reward-model step 4% faster.
      At GPT-2's 3072 x 768 the product alone is about even (131 / 126) and the whole SFT step was
      5% slower with the copy, so larger N keep Eigen's product.
    The copy is made only in those cases; it changes the summation order, not the product.
    """
    return n % 4096 == 0 or (k >= 4 * n and n <= 256)


def _weight_grad(x2: Array, g2: Array) -> Array:
    return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weight_grad_cpu(x2: Array, g2: Array) -> Array:
    if not cpu_weight_grad_transposes_first(x2.shape[-1], g2.shape[-1]):
        return _weight_grad(x2, g2)
    # the barrier keeps XLA from folding the transpose back into the dot's dimension numbers
    xt = jax.lax.optimization_barrier(jnp.swapaxes(x2, -1, -2))
    return jax.lax.dot_general(xt, g2, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _linear_bwd(out_dtype, res, g):
    x, w = res
    k, n = w.shape
    x2 = x.reshape(-1, k)
    g2 = g.reshape(-1, n).astype(x.dtype)
    dx = jax.lax.dot_general(g2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    # the same product in every branch (equal up to float summation order); only the CPU one reorients it
    dw = jax.lax.platform_dependent(x2, g2, cpu=_weight_grad_cpu, default=_weight_grad)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Linear(nn.Module):
    """Dense layer over the last `len(in_axes_shape)` axes with an arbitrary output shape.

    Parameter names and shapes are those of `nn.DenseGeneral` (`kernel [*in, *features]`,
    `bias [*features]`), so checkpoints are unchanged; the matmul is `linear` (custom VJP).
    """

    features: Any  # int or tuple of ints
    n_in: int = 1  # how many trailing input axes are contracted
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", self.kernel_init, tuple(in_shape) + feats, self.param_dtype)
        k, n = int(np.prod(in_shape)), int(np.prod(feats))
        x2 = x.astype(self.dtype).reshape(x.shape[:x.ndim - self.n_in] + (k,))
        y = linear(x2, kernel.astype(self.dtype).reshape(k, n))
        if self.has_variable("lora", "a"):  # LoRA, unmerged: + (x·a)·(s·b) (models/lora.py, `lora_variables`)
            a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
            xa = x2
            if self.has_variable("lora", "dropout") and self.has_rng("dropout"):
                # LoRA dropout (PEFT's lora_B(lora_A(dropout(x)))): inverted dropout on the adapter's input
                # only, the base path untouched; a mask of its own per module (make_rng folds in the path)
                keep = 1.0 - jnp.asarray(self.get_variable("lora", "dropout"), jnp.float32)
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x2.shape)
                xa = jnp.where(mask, (x2 * (1.0 / keep)).astype(self.dtype), jnp.zeros((), self.dtype))
            y = y + linear(linear(xa, a.astype(self.dtype)), b.astype(self.dtype))
        y = y.reshape(x.shape[:x.ndim - self.n_in] + feats)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, feats, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------------------------
# attention core (training path) with a FlashAttention-style backward pass
# ----------------------------------------------------------------------------------------------
_NEG = float(np.finfo(np.float32).min)


def _attn_scores(q, k, allowed, scale, k_spec="bskd"):
    """Masked float32 scores `[B,K,G,T,S]` (bf16 scores would blur the softmax); k laid out as `k_spec`."""
    s = jnp.einsum(f"btkgd,{k_spec}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(allowed[:, None, None, :, :], s, _NEG)


def _attn_fwd_impl(q, k, v, allowed, scale):
    s = _attn_scores(q, k, allowed, scale)
    mx = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - mx)
    denom = jnp.sum(e, axis=-1)  # [B,K,G,T]
    # normalise the [T, Dh] output instead of the [T, S] probabilities (one pass fewer over S)
    o = jnp.einsum("bkgts,bskd->btkgd", e.astype(q.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.transpose(denom, (0, 3, 1, 2))[..., None]
    # (max, sum) rather than their log-sum-exp: on a row with no allowed key every score is the
    # float32 minimum, and `min + log(S)` rounds back to `min`
    return o.astype(q.dtype), (mx[..., 0], denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_core(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """`softmax(q·kᵀ·scale masked by allowed)·v` for q `[B,T,K,G,Dh]`, k/v `[B,S,K,Dh]`, allowed `[B,T,S]`.

    Scores and softmax statistics are float32. The backward pass recomputes the probabilities
    from the saved row max and sum and uses `Δ = rowsum(dO ∘ O)` (FlashAttention's identity) instead
    of reducing `dP ∘ P` over the key axis, so it keeps no `[T, S]` probabilities between the
    passes and makes fewer full passes over them. Rows with no allowed key get a uniform
    distribution (never NaN), as before.
    """
    return _attn_fwd_impl(q, k, v, allowed, scale)[0]


def _attention_core_fwd(q, k, v, allowed, scale):
    o, stats = _attn_fwd_impl(q, k, v, allowed, scale)
    return o, (q, k, v, allowed, o, stats)


def _attention_core_bwd(scale, res, do):
    q, k, v, allowed, o, (mx, denom) = res
    s = _attn_scores(q, k, allowed, scale)
    p = jnp.exp(s - mx[..., None]) / denom[..., None]  # [B,K,G,T,S]
    do = do.astype(q.dtype)
    dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(q.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B,T,K,G]
    ds = p * (dp - jnp.transpose(delta, (0, 2, 3, 1))[..., None])
    ds = jnp.where(allowed[:, None, None, :, :], ds, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


# ----------------------------------------------------------------------------------------------
# blocked attention: query x key blocks, online softmax, fully masked blocks skipped
# ----------------------------------------------------------------------------------------------
def _block_plan(t: int, s: int, block: int, causal: bool, window: int | None):
    """Static plan `[(q0, q1, [j, ...]), ...]`: for each query block, the key blocks `[j·block, ...)` it visits.

    With `causal` (the caller guarantees `allowed[b, t, s]` implies `s <= t`, slots = positions along
    T = S) key blocks after the query block are skipped; with `window` too, key blocks whose every
    key is at least `window` slots before every query of the block.
    """
    n_k = -(-s // block)
    plan = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        js = []
        for j in range(n_k):
            k0, k1 = j * block, min((j + 1) * block, s)
            if causal and k0 > q1 - 1:
                continue
            if causal and window is not None and q0 - (k1 - 1) >= window:
                continue
            js.append(j)
        plan.append((q0, q1, js))
    return plan


def _head_major_blocks(x, length: int, block: int):
    """`[B, L, K, (G,) Dh]` -> `[n, B, K, (G,) block, Dh]`: padded to whole blocks, heads before positions.

    One transpose of the whole array, so that every tile below is a plain batched matmul over
    `(B, K)` with contiguous `(G, block) x Dh` operands (a tile in the `[B, T, K, G, Dh]` layout would
    need its own transposes, several per tile, which took about a third of the blocked attention's
    time on CPU)."""
    pad = -(-length // block) * block - length
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    n = x.shape[1] // block
    x = x.reshape((x.shape[0], n, block) + x.shape[2:])  # [B, n, block, K, (G,) Dh]
    order = (1, 0) + tuple(range(3, x.ndim - 1)) + (2, x.ndim - 1)
    return jnp.transpose(x, order)


def _from_head_major(blocks: list, length: int) -> Array:
    """Inverse of :func:`_head_major_blocks` for a list of `[B, K, (G,) block, Dh]` tiles."""
    x = jnp.concatenate(blocks, axis=-2)[..., :length, :]  # [B, K, (G,) L, Dh]
    nd = x.ndim
    return jnp.transpose(x, (0, nd - 2) + tuple(range(1, nd - 2)) + (nd - 1,))


def _tile_allowed(allowed, block):
    """`allowed [B,T,S]` padded to whole blocks (pads: not allowed) as `[nq, nk, B, bq, bk]`."""
    b, t, s = allowed.shape
    tp, sp = -(-t // block) * block, -(-s // block) * block
    if tp != t or sp != s:
        allowed = jnp.pad(allowed, ((0, 0), (0, tp - t), (0, sp - s)))
    return jnp.transpose(allowed.reshape(b, tp // block, block, sp // block, block), (1, 3, 0, 2, 4))


def _tile_scores(qi, kj, aij, scale):
    """Masked float32 scores `[B,K,G,bq,bk]` of one tile: qi `[B,K,G,bq,Dh]`, kj `[B,K,bk,Dh]`, aij `[B,bq,bk]`."""
    sc = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(aij[:, None, None], sc, _NEG)


def _row_blocks(x, t_pad: int, block: int):
    """`[B,K,G,T]` row statistics -> `[nq,B,K,G,bq,1]` (padded to `t_pad` rows)."""
    t = x.shape[-1]
    if t_pad != t:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, t_pad - t)))
    b, kh, g, _ = x.shape
    return jnp.moveaxis(x.reshape(b, kh, g, t_pad // block, block), 3, 0)[..., None]


def _blocked_fwd_impl(q, k, v, allowed, scale, block, causal, window):
    b, t, kh, g, d = q.shape
    s_len = k.shape[1]
    qb, kb, vb = (_head_major_blocks(x, x.shape[1], block) for x in (q, k, v))
    ab = _tile_allowed(allowed, block)
    outs, ms, ls = [], [], []
    for i, (_, _, js) in enumerate(_block_plan(t, s_len, block, causal, window)):
        m = jnp.full((b, kh, g, block), _NEG, jnp.float32)  # running row max of the (masked) scores
        l = jnp.zeros((b, kh, g, block), jnp.float32)  # running sum of exp(score - m)
        acc = jnp.zeros((b, kh, g, block, d), jnp.float32)  # running un-normalised output
        for j in js:
            sc = _tile_scores(qb[i], kb[j], ab[i, j], scale)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            alpha = jnp.exp(m - m_new)
            # a masked score is the float32 minimum: exp(min - m) = 0 once the row has an allowed key;
            # what a row accumulates before its first allowed key is scaled away by alpha = 0 then
            p = jnp.exp(sc - m_new[..., None])
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(q.dtype), vb[j], preferred_element_type=jnp.float32)
            acc = acc * alpha[..., None] + pv
            m = m_new
        outs.append(acc / jnp.maximum(l, 1e-30)[..., None])
        ms.append(m)
        ls.append(l)
    o = _from_head_major(outs, t)  # [B,T,K,G,Dh]
    # a row with no allowed key: the uniform distribution over all S keys, as `attention_core`
    o = jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None, None], o,
                  jnp.mean(v.astype(jnp.float32), axis=1)[:, None, :, None, :])
    return o.astype(q.dtype), (jnp.concatenate(ms, axis=-1)[..., :t], jnp.concatenate(ls, axis=-1)[..., :t])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def blocked_attention(q: Array, k: Array, v: Array, allowed: Array, scale: float, block: int,
                      causal: bool = False, window: int | None = None) -> Array:
    """`attention_core` computed over `block × block` tiles of (query, key) with an online softmax.

    Same inputs, outputs and masking semantics as `attention_core` (to float rounding): a query
    block keeps a running row max `m`, sum `l` and un-normalised output, rescaled by `exp(m - m')`
    at each key block. Only the visited tiles are computed: with `causal=True` (the caller
    guarantees that `allowed` implies key slot <= query slot, T = S) the tiles above the diagonal,
    and with `window` too those entirely outside the sliding window, are skipped (at T = 8 blocks,
    36 of 64 tiles are computed). The backward pass recomputes each tile's probabilities from the
    saved `m`, `l` and uses `Δ = rowsum(dO ∘ O)`; no `[T, S]` array exists in either pass. Rows
    with no allowed key get the uniform distribution over all S keys (never NaN). T and S are
    padded to whole blocks; the tiles are unrolled at trace time, so the program grows as
    `(T / block)²`.
    """
    return _blocked_fwd_impl(q, k, v, allowed, scale, block, causal, window)[0]


def _blocked_fwd(q, k, v, allowed, scale, block, causal, window):
    o, stats = _blocked_fwd_impl(q, k, v, allowed, scale, block, causal, window)
    return o, (q, k, v, allowed, o, stats)


def _blocked_bwd(scale, block, causal, window, res, do):
    q, k, v, allowed, o, (m, l) = res
    b, t, kh, g, d = q.shape
    s_len = k.shape[1]
    do = do.astype(q.dtype)
    nonempty = jnp.any(allowed, axis=-1)  # [B,T]
    delta = jnp.transpose(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), (0, 2, 3, 1))
    # 1/l, and 0 on rows with no allowed key: their recomputed p is then 0 everywhere (their
    # uniform distribution is added to dv below), so no tile needs the mask again
    inv_l = jnp.where(nonempty[:, None, None, :], 1.0 / jnp.maximum(l, 1e-30), 0.0)
    qb, kb, vb = (_head_major_blocks(x, x.shape[1], block) for x in (q, k, v))
    dob = _head_major_blocks(do, t, block)
    ab = _tile_allowed(allowed, block)
    t_pad = qb.shape[0] * block
    mb, ilb, db = (_row_blocks(x, t_pad, block) for x in (m, inv_l, delta))
    dqs, dks, dvs = [], {}, {}
    for i, (_, _, js) in enumerate(_block_plan(t, s_len, block, causal, window)):
        dq = None
        for j in js:
            p = jnp.exp(_tile_scores(qb[i], kb[j], ab[i, j], scale) - mb[i]) * ilb[i]  # [B,K,G,bq,bk]
            dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(q.dtype), dob[i], preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgtd,bksd->bkgts", dob[i], vb[j], preferred_element_type=jnp.float32)
            ds = (p * (dp - db[i])).astype(q.dtype)
            dqj = jnp.einsum("bkgts,bksd->bkgtd", ds, kb[j], preferred_element_type=jnp.float32)
            dk = jnp.einsum("bkgts,bkgtd->bksd", ds, qb[i], preferred_element_type=jnp.float32)
            dq = dqj if dq is None else dq + dqj
            dks[j] = dk if j not in dks else dks[j] + dk
            dvs[j] = dv if j not in dvs else dvs[j] + dv
        dqs.append(dq if dq is not None else jnp.zeros((b, kh, g, block, d), jnp.float32))
    zero = jnp.zeros((b, kh, block, d), jnp.float32)
    n_k = kb.shape[0]
    dq = _from_head_major(dqs, t) * scale
    dk = _from_head_major([dks.get(j, zero) for j in range(n_k)], s_len) * scale
    dv = _from_head_major([dvs.get(j, zero) for j in range(n_k)], s_len)
    # rows with no allowed key spread their output gradient uniformly over the S values
    empty = ~nonempty[:, :, None, None, None]
    dv = dv + (jnp.sum(jnp.where(empty, do.astype(jnp.float32), 0.0), axis=(1, 3)) / s_len)[:, None]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


def cudnn_attention(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """`attention_core` through `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).

    The boolean `allowed [B,T,S]` goes in as the kernel's mask; rows with no allowed key are then
    replaced by the mean of the values (the uniform distribution of `attention_core`), so their
    gradient reaches only `v`, as there.
    """
    b, t, kh, g, d = q.shape
    o = jax.nn.dot_product_attention(q.reshape(b, t, kh * g, d), k, v, mask=allowed[:, None], scale=scale,
                                     implementation="cudnn")
    o = o.reshape(b, t, kh, g, d)
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1).astype(o.dtype)[:, None, :, None, :]
    return jnp.where(jnp.any(allowed, axis=-1)[:, :, None, None, None], o, mean_v)


def resolve_attention_impl(config: ModelConfig, seq_len: int, platform: str | None = None) -> str:
    """The implementation a full-sequence forward of `seq_len` query tokens uses: "xla", "blocked" or "cudnn".

    `config.attention_impl` unless it is "auto": then "cudnn" on a GPU when the compute dtype is
    bfloat16/float16 and the head dim a multiple of 8 up to 128 (what the cuDNN kernel takes),
    "blocked" on CPU from `seq_len >= 2 * attention_block` (shorter rows are one or two tiles, where
    the tiles only add overhead), else "xla". "cudnn" off a GPU raises `ConfigError` naming the key.
    `platform` defaults to `rlhf_jax.devices.platform()` (the platform the program is built for: the
    host's, or a plan's target).
    """
    platform = platform or devices_lib.platform()
    impl = config.attention_impl
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"ModelConfig.attention_impl='cudnn' (config key model.attention_impl / "
                          f"policy.attention_impl) needs a GPU, but this program is traced for {platform!r}; use "
                          f"'auto' (picks per platform), 'blocked' or 'xla'")
    if impl != "auto":
        return impl
    if platform == "gpu":
        ok = config.dtype in ("bfloat16", "float16") and config.head_dim % 8 == 0 and config.head_dim <= 128
        return "cudnn" if ok else "xla"
    if platform == "cpu" and seq_len >= 2 * config.attention_block:
        return "blocked"
    return "xla"


def attention(q: Array, k: Array, v: Array, allowed: Array, scale: float, *, config: ModelConfig,
              causal: bool = False, window: int | None = None) -> Array:
    """Full-sequence attention by `config.attention_impl` (`resolve_attention_impl`); all equal `attention_core`.

    `causal=True` promises that `allowed` implies key slot <= query slot with T = S, and `window`
    that it implies `query slot - key slot < window`: the blocked implementation then skips the
    tiles those rule out.
    """
    impl = resolve_attention_impl(config, q.shape[1])
    if impl == "blocked":
        return blocked_attention(q, k, v, allowed, scale, config.attention_block, causal, window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, allowed, scale)
    return attention_core(q, k, v, allowed, scale)


def _activation(name: str):
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    return jax.nn.silu  # silu / swish (validated by ModelConfig)


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """`scale · x / sqrt(mean(x²) + eps)`, statistics in float32 (as transformers)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _norm(config: ModelConfig, name: str | None = None):
    if config.norm_type == "layernorm":
        return nn.LayerNorm(epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                            use_fast_variance=False, name=name)
    return RMSNorm(config.norm_eps, config.dtype, config.param_dtype, name=name)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with RoPE or none (gpt2), optional q/k norm."""

    config: ModelConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x, positions, allowed, cache_k, cache_v, cache_index):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        dense = lambda feats, bias, name: Linear(  # noqa: E731
            feats, use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype, kernel_init=init, name=name
        )
        b, t, _ = x.shape
        q = dense((c.num_heads, c.head_dim), c.attention_bias, "q_proj")(x)  # [B,T,H,Dh]
        k = dense((c.num_kv_heads, c.head_dim), c.attention_bias, "k_proj")(x)  # [B,T,K,Dh]
        v = dense((c.num_kv_heads, c.head_dim), c.attention_bias, "v_proj")(x)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
        if not c.learned_positions:
            inv_freq = rope_inv_freq(c)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        g = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, c.num_kv_heads, g, c.head_dim)
        if cache_k is None:  # training / scoring: `allowed` is causal (+ window) over T = S slots
            out = attention(qg, k, v, allowed, c.head_dim ** -0.5, config=c, causal=True, window=c.sliding_window)
        else:
            # this layer's cache [B, K, S, Dh] is its own buffer: the T new keys are written in place
            # and the score/value matmuls read it as it lies (no per-step slice or transpose copies)
            zero = jnp.zeros((), jnp.int32)
            start = (zero, zero, cache_index, zero)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
            scores = _attn_scores(qg, cache_k.astype(c.dtype), allowed, c.head_dim ** -0.5, "bksd")
            probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
            out = jnp.einsum("bkgts,bksd->btkgd", probs, cache_v.astype(c.dtype))
        out = out.reshape(b, t, c.num_heads, c.head_dim)
        out = Linear(c.hidden_size, n_in=2, use_bias=c.attention_out_bias, dtype=c.dtype,
                     param_dtype=c.param_dtype, kernel_init=init, name="o_proj")(out)
        return out, cache_k, cache_v


class MLP(nn.Module):
    """SwiGLU `down(act(gate(x)) · up(x))` or, for gpt2, `down(gelu(up(x)))`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda feats, name: Linear(  # noqa: E731
            feats, use_bias=c.mlp_bias, dtype=c.dtype, param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range), name=name
        )
        act = _activation(c.hidden_act)
        if c.gated_mlp:
            h = act(dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size, "up_proj")(x)
        else:
            h = act(dense(c.intermediate_size, "up_proj")(x))
        return dense(c.hidden_size, "down_proj")(h)


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    config: ModelConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x, positions, allowed, cache_k, cache_v, cache_index):
        c = self.config
        h, cache_k, cache_v = Attention(c, self.layer_idx, name="attn")(
            _norm(c, "attn_norm")(x), positions, allowed, cache_k, cache_v, cache_index
        )
        x = x + h
        x = x + MLP(c, name="mlp")(_norm(c, "mlp_norm")(x))
        return x, cache_k, cache_v


def _check_inputs(input_ids, attention_mask, positions, segment_ids, cache):
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: expected an integer array [B, T], got {input_ids.dtype}{list(input_ids.shape)}")
    for name, a in (("attention_mask", attention_mask), ("positions", positions), ("segment_ids", segment_ids)):
        if a is not None and tuple(a.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name}: expected shape {list(input_ids.shape)} like input_ids, got {list(a.shape)}")
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
        if cache.k[0].shape[0] != input_ids.shape[0]:
            raise ValueError(f"cache batch {cache.k[0].shape[0]} != input_ids batch {input_ids.shape[0]}")


class LMHead(nn.Module):
    """Untied output projection `kernel [D, V]`; logits accumulated in float32 (log-probs of a bf16
    model stay accurate enough for PPO ratios)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        c = self.config
        kernel = self.param("kernel", nn.initializers.normal(c.initializer_range), (c.hidden_size, c.vocab_size),
                            c.param_dtype)
        return linear(hidden.astype(c.dtype), kernel.astype(c.dtype), jnp.float32)


class Transformer(nn.Module):
    """Embeddings + L blocks + final norm. Returns `(hidden [B,T,D] final-normed, cache or None)`."""

    config: ModelConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                              embedding_init=init)
        if c.learned_positions:
            self.pos_embed = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=c.dtype,
                                      param_dtype=c.param_dtype, embedding_init=init)
        if c.remat:
            policy = jax.checkpoint_policies.dots_saveable if c.remat_policy == "dots_saveable" else None
            block = nn.remat(Block, policy=policy)
        else:
            block = Block
        self.layers = [block(c, i) for i in range(c.num_layers)]
        self.final_norm = _norm(c)

    def attend(self, hidden: Array) -> Array:
        """`hidden @ embedding.T` (tied output projection) -> `[B, T, V]` accumulated in float32."""
        emb = self.embed.embedding.astype(self.config.dtype)
        return linear(hidden.astype(self.config.dtype), emb.T, jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        positions = None if positions is None else jnp.asarray(positions)
        _check_inputs(input_ids, attention_mask, positions, segment_ids, cache)
        b, t = input_ids.shape
        if attention_mask is not None:
            valid = attention_mask.astype(bool)
        elif segment_ids is not None:
            valid = segment_ids != 0
        else:
            valid = jnp.ones((b, t), bool)

        if cache is None:
            q_slot = jnp.arange(t, dtype=jnp.int32)
            k_slot = q_slot
            key_valid = valid
            if positions is None:
                positions = positions_from_segments(segment_ids) if segment_ids is not None else positions_from_mask(valid)
            cache_k = cache_v = cache_index = None
        else:
            index = cache.index.astype(jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.mask, valid.astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
            q_slot = index + jnp.arange(t, dtype=jnp.int32)
            k_slot = jnp.arange(cache.max_len, dtype=jnp.int32)
            if positions is None:
                before = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
                positions = jnp.maximum(before + jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
            key_valid = key_valid.astype(bool)
            cache_k, cache_v, cache_index = cache.k, cache.v, index
        allowed = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]  # [B,T,S]
        if c.sliding_window is not None:
            allowed &= (q_slot[:, None] - k_slot[None, :] < c.sliding_window)[None]
        if segment_ids is not None:
            allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
        positions = positions.astype(jnp.int32)

        x = self.embed(input_ids)
        if c.learned_positions:
            x = x + self.pos_embed(positions)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_k = None if cache_k is None else cache_k[i]
            layer_v = None if cache_v is None else cache_v[i]
            x, layer_k, layer_v = layer(x, positions, allowed, layer_k, layer_v, cache_index)
            new_k.append(layer_k)
            new_v.append(layer_v)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask=key_valid.astype(jnp.int32), index=cache.index + t)
        return x, new_cache


class CausalLM(nn.Module):
    """Decoder-only language model.

    `model.apply(params, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
    cache=None)` -> logits `[B, T, V]` float32, or `(logits, cache)` when a `KVCache` is given.

    - `attention_mask [B, T]`: 1 on real tokens (left or right padding); pads are never attended to.
    - `positions` default to `max(cumsum(mask) - 1, 0)` (counted from each row's first real token);
      with `segment_ids` to the index within each segment; with a cache they continue from the
      number of valid slots already in the cache.
    - `segment_ids [B, T]` (packed rows, 0 = pad): attention never crosses segments.
    - cache: the T new keys are written at slots `index..index+T`, marked valid per
      `attention_mask`; each query attends to the valid slots at or before its own slot.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.model = Transformer(c)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c)

    def logits_from_hidden(self, hidden: Array) -> Array:
        """`[B, T, D]` final-normed hidden -> logits `[B, T, V]` float32."""
        out = self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def output_kernel(self) -> Array:
        """The output projection as a `[D, V]` matrix in the compute dtype (`embedding.T` when tied).

        `logits_from_hidden(h) == linear(h, output_kernel(), float32)`. A decode loop can take it
        once, outside the loop: on CPU, `generation.engine` then reads a row-major copy of a tied
        embedding instead of contracting the embedding's minor axis at every step.
        """
        c = self.config
        if c.tie_word_embeddings:
            return self.model.embed.embedding.astype(c.dtype).T
        return self.lm_head.variables["params"]["kernel"].astype(c.dtype)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None):
        """Final-normed hidden states `[B, T, D]` (compute dtype), or `(hidden, cache)` with a cache."""
        h, new_cache = self.model(input_ids, attention_mask, positions, segment_ids, cache)
        return h if cache is None else (h, new_cache)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None):
        h, new_cache = self.model(input_ids, attention_mask, positions, segment_ids, cache)
        logits = self.logits_from_hidden(h)
        return logits if cache is None else (logits, new_cache)


def init_params(model: nn.Module, rng: Array, *, seq_len: int = 1) -> dict:
    """Random parameters `{"params": ...}` for `model` (shapes do not depend on `seq_len`)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return {"params": jax.jit(model.init)(rng, ids)["params"]}
