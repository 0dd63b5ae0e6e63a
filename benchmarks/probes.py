"""Hardware probes: the matmul peak and the memory-copy bandwidth this machine reaches right now.

The machine drifts (other jobs share it), so the suite runs a short matmul probe before every item
and reports it beside the figures; ratios measured back to back are what to read.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

# Dense bf16 peak (TFLOP/s, no sparsity) and HBM bandwidth (TB/s) by `jax.Device.device_kind`.
# From the vendors' data sheets (SXM parts where a kind name does not say).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (989.0, 3.35),
    "NVIDIA H100 PCIe": (756.0, 2.0),
    "NVIDIA H100 NVL": (835.0, 3.9),
    "NVIDIA H200": (989.0, 4.8),
    "NVIDIA A100-SXM4-80GB": (312.0, 2.04),
    "NVIDIA A100-SXM4-40GB": (312.0, 1.56),
    "NVIDIA A100-PCIE-40GB": (312.0, 1.56),
    "NVIDIA A100 80GB PCIe": (312.0, 1.94),
    "NVIDIA L4": (121.0, 0.3),
    "NVIDIA A10G": (125.0, 0.6),
}


def lookup_gpu_peak(device_kind: str) -> tuple[float, float] | None:
    """(bf16 TFLOP/s, HBM TB/s) for a device kind, matching exactly, then by prefix; None if unknown."""
    if device_kind in GPU_PEAKS:
        return GPU_PEAKS[device_kind]
    for kind, peak in GPU_PEAKS.items():
        if device_kind.startswith(kind) or kind.startswith(device_kind):
            return peak
    return None


def _best_rate(call, work: float, min_time: float, max_reps: int = 50) -> float:
    """Best ``work / seconds`` over repeated calls until ``min_time`` has been spent."""
    best = 0.0
    spent = 0.0
    reps = 0
    while (spent < min_time or reps < 2) and reps < max_reps:
        t = time.perf_counter()
        call()
        dt = time.perf_counter() - t
        spent += dt
        reps += 1
        best = max(best, work / dt)
    return best


def jax_matmul_flops(n: int, *, dtype: str = "float32", min_time: float = 0.3) -> float:
    """FLOP/s of one jitted ``[n,n] @ [n,n]`` in JAX (``2·n³`` FLOPs a call), best of the calls."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), dtype=jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype=jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    return _best_rate(lambda: f(a, b).block_until_ready(), 2.0 * n**3, min_time)


def torch_matmul_flops(n: int, *, min_time: float = 0.3) -> float:
    """FLOP/s of a float32 ``[n,n] @ [n,n]`` in PyTorch on the CPU, best of the calls."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    return _best_rate(lambda: torch.matmul(a, b, out=out), 2.0 * n**3, min_time)


def jax_copy_bandwidth(nbytes: int, *, min_time: float = 0.3) -> float:
    """Bytes/s of a jitted elementwise pass over ``nbytes`` of float32 (read + write counted)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001)
    f(x).block_until_ready()
    return _best_rate(lambda: f(x).block_until_ready(), 2.0 * x.nbytes, min_time)


def numpy_copy_bandwidth(nbytes: int, *, min_time: float = 0.3) -> float:
    """Bytes/s of ``np.copyto`` between two buffers of ``nbytes`` (read + write counted)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return _best_rate(lambda: np.copyto(dst, src), 2.0 * src.nbytes, min_time)


def quick_probe(platform: str) -> float:
    """A short matmul probe (about 0.2 s) run before every item: JAX FLOP/s at a mid size."""
    if platform == "cpu":
        return jax_matmul_flops(512, min_time=0.2)
    return jax_matmul_flops(4096, dtype="bfloat16", min_time=0.2)


def full_probe(platform: str, *, quick: bool) -> dict[str, Any]:
    """The peak probes of a run: matmul FLOP/s (JAX and, on CPU, PyTorch) and copy bandwidth.

    ``matmul_peak_flops`` is the best matmul rate seen by either framework at any probed size: the
    denominator of the suite's MFU on CPU. On a GPU the data-sheet peak is used instead (see
    ``GPU_PEAKS`` / ``--peak-tflops``) and the measured bf16 matmul is reported beside it.
    """
    min_time = 0.2 if quick else 0.5
    out: dict[str, Any] = {"platform": platform}
    if platform == "cpu":
        sizes = (512, 1024) if quick else (512, 1024, 2048)
        out["jax_matmul_flops"] = {n: jax_matmul_flops(n, min_time=min_time) for n in sizes}
        out["torch_matmul_flops"] = {n: torch_matmul_flops(n, min_time=min_time) for n in sizes}
        out["matmul_peak_flops"] = max(
            max(out["jax_matmul_flops"].values()), max(out["torch_matmul_flops"].values())
        )
        nbytes = (64 if quick else 256) * 2**20
        out["jax_copy_bytes_per_s"] = jax_copy_bandwidth(nbytes, min_time=min_time)
        out["numpy_copy_bytes_per_s"] = numpy_copy_bandwidth(nbytes, min_time=min_time)
        out["copy_bandwidth_bytes_per_s"] = max(out["jax_copy_bytes_per_s"], out["numpy_copy_bytes_per_s"])
    else:
        sizes = (4096, 8192)
        out["jax_matmul_flops"] = {n: jax_matmul_flops(n, dtype="bfloat16", min_time=min_time) for n in sizes}
        out["matmul_peak_flops"] = max(out["jax_matmul_flops"].values())
        out["jax_copy_bytes_per_s"] = jax_copy_bandwidth(2**30, min_time=min_time)
        out["copy_bandwidth_bytes_per_s"] = out["jax_copy_bytes_per_s"]
    return out
