"""The benchmark suite: ``python -m benchmarks.run`` / ``rlhf-jax bench`` / ``make bench``.

For each item it builds the same shapes with random weights in rlhf_jax and in the peer
(transformers/TRL on PyTorch CPU, Tunix in its own venv), runs both back to back in this process
tree (Tunix in a child process), and prints a Markdown table with absolute figures and speed-up
ratios; ``latest.json`` and ``latest.md`` go to ``--out`` (default ``benchmarks/results``).

Items (``--only``): sft, rm, gen, ppo, sweep, mfu, tunix (the default set), and the accelerator items
rl (the fused PPO and GRPO iterations: seconds, rollout share, MFU), attn (the SFT step with
``attention_impl=xla`` against ours) and chunk (the SFT step with chunked logits against whole logits),
run only when named. Shapes: tiny and gpt2 on CPU (``--quick``: tiny only, fewer repetitions); on a GPU
(bf16) gpt2 and llama1b; ``--item-shapes`` gives an item its own. ``benchmarks/gpu_check.sh`` is the
one accelerator run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import os
import platform as _platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks import data, probes, report, shapes
from benchmarks.errors import NotAvailable
from benchmarks.report import Row

DEFAULT_ITEMS = ("sft", "rm", "gen", "ppo", "sweep", "mfu", "tunix")
ITEMS = DEFAULT_ITEMS + ("rl", "attn", "chunk")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TRL_VERSION = "1.12.0"
# Issue 10's targets (speed-up over the peer unless said otherwise).
TARGETS = {
    ("gen", "tiny"): 3.0,
    ("gen", "gpt2"): 1.5,
    "sft": 1.2,
    "rm": 1.2,
    "ppo": 5.0,
    "tunix": 1.5,
    "sweep_fraction": 0.7,  # N vmapped runs >= 0.7 * N x the throughput of one
    "mfu_cpu": 0.5,
    "mfu_gpu": 0.45,
    # issue 22, one H200, bf16 compute: SFT and reward-model step MFU per shape
    ("mfu_gpu", "gpt2"): 0.35,
    ("mfu_gpu", "llama1b"): 0.50,
    # issue 22: decode step <= 1.5x the HBM floor on a GPU (issue 10: <= 2x the copy-bandwidth floor on
    # CPU), written as floor / step >= 1 / x (the table's ratio is a speed-up: floor over ours)
    "decode_floor_gpu": 1.5,
    "decode_floor_cpu": 2.0,
    "rl_mfu_grpo": 0.30,  # issue 22: the fused GRPO iteration's MFU at the 1B shape on one GPU
}
# chunk item: the SFT loss's logits this many positions at a time (SFTStepConfig.logits_chunk)
DEFAULT_LOGITS_CHUNK = 128


@dataclasses.dataclass
class Context:
    """What every item needs: options, platform, probes and results shared between items."""

    quick: bool
    workload: shapes.Workload
    platform: str
    dtype: str
    reps: int
    peak_flops: float
    peak_source: str
    hbm_bytes_per_s: float | None
    allow_install: bool
    tunix_venv: Path
    copy_bandwidth: float = 0.0
    attention_impl: str = "auto"
    gen_batches: tuple[int, ...] = ()
    logits_chunk: int = DEFAULT_LOGITS_CHUNK
    sft_cache: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    rm_cache: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: int = 0

    def probe(self) -> float:
        """GFLOP/s of the short matmul probe on the device the items run on (``jax.default_backend()``)."""
        import jax

        return probes.quick_probe(jax.default_backend()) / 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's options (shared by ``python -m benchmarks.run`` and ``rlhf-jax bench``)."""
    parser.add_argument("--quick", action="store_true", help="tiny shape only, few repetitions")
    parser.add_argument(
        "--only", default=",".join(DEFAULT_ITEMS),
        help=f"comma-separated items to run (in this order), from: {','.join(ITEMS)}; default {','.join(DEFAULT_ITEMS)}",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for latest.json and latest.md")
    parser.add_argument(
        "--shapes", default=None,
        help="comma-separated shapes for sft/rm/gen/mfu (default: tiny,gpt2 on CPU, gpt2,llama1b on GPU; "
        "--quick: tiny); ppo, sweep and tunix always use the first shape that is tiny or micro",
    )
    parser.add_argument(
        "--item-shapes", default="",
        help="per-item shapes replacing --shapes for that item: ITEM=SHAPE[+SHAPE],... "
        "(e.g. rl=llama1b,gen=llama1b,attn=llama1b)",
    )
    parser.add_argument(
        "--gen-batches", default="",
        help="gen: comma-separated batch sizes (default: the workload's, 16); the first also gets the sampling "
        "row and the decode step vs the bandwidth floor, the others greedy new tokens/s only",
    )
    parser.add_argument("--logits-chunk", type=int, default=DEFAULT_LOGITS_CHUNK,
                        help="chunk: SFTStepConfig.logits_chunk of the chunked SFT step (positions per chunk)")
    parser.add_argument(
        "--workload", default="issue", choices=sorted(shapes.WORKLOADS),
        help="batch sizes and lengths: 'issue' (the issue's numbers) or 'micro' (smoke test only)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per step (default 5, quick 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU: dense bf16 peak for MFU (default: from the device kind table)")
    parser.add_argument("--hbm-tbps", type=float, default=None,
                        help="GPU: HBM bandwidth (TB/s) for the decode floor (default: device kind table)")
    parser.add_argument("--no-install", action="store_true",
                        help="never pip install (trl into this env, google-tunix into its venv); rows "
                        "that need them say 'not available'")
    parser.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "blocked", "cudnn"),
                        help="our models' ModelConfig.attention_impl (the config key model.attention_impl); "
                        "auto: blocked on CPU, cuDNN on a GPU")
    parser.add_argument("--tunix-venv", default=str(Path(__file__).resolve().parent / ".venv-tunix"),
                        help="virtual environment for google-tunix (made on first use)")


def _items(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in ITEMS]
    if bad or not items:
        raise SystemExit(f"--only: unknown item(s) {bad or text!r}; expected a comma-separated subset of {ITEMS}")
    return items


def _item_shapes(text: str) -> dict[str, list[str]]:
    """``--item-shapes`` ``"rl=llama1b,gen=gpt2+llama1b"`` -> ``{"rl": ["llama1b"], "gen": ["gpt2", "llama1b"]}``."""
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        item, eq, names = part.partition("=")
        item = item.strip()
        shape_names = [n.strip() for n in names.split("+") if n.strip()]
        if not eq or item not in ITEMS or not shape_names:
            raise SystemExit(f"--item-shapes: bad entry {part!r}; expected ITEM=SHAPE[+SHAPE] with ITEM from {ITEMS}")
        if item in out:
            raise SystemExit(f"--item-shapes: item {item!r} given twice")
        for n in shape_names:
            if n not in shapes.SHAPES:
                raise SystemExit(f"--item-shapes: unknown shape {n!r} for {item}; expected one of {sorted(shapes.SHAPES)}")
        out[item] = shape_names
    return out


def _batches(text: str, default: int) -> tuple[int, ...]:
    """``--gen-batches`` ``"16,64,256"`` -> ``(16, 64, 256)``; empty: ``(default,)``."""
    if not text.strip():
        return (default,)
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        out = ()
    if not out or any(b < 1 for b in out) or len(set(out)) != len(out):
        raise SystemExit(f"--gen-batches: expected distinct positive integers separated by commas, got {text!r}")
    return out


def _machine(platform: str) -> dict[str, Any]:
    import jax

    cpu = _platform.processor() or _platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "jax_platform": platform,
        "jax_device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}",
        "versions": versions,
    }


def ensure_trl(allow_install: bool) -> None:
    """Makes ``trl==1.12.0`` (and ``requests``) importable here, pip-installing them if allowed."""
    have = None
    if importlib.util.find_spec("trl") is not None:
        have = importlib.metadata.version("trl")
    if have == TRL_VERSION and importlib.util.find_spec("requests") is not None:
        return
    if not allow_install:
        raise NotAvailable(f"trl=={TRL_VERSION} is not installed (found {have}) and --no-install was given")
    cmd = [sys.executable, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", "requests"]
    constraints = Path(__file__).resolve().parent.parent / "constraints.txt"
    if constraints.exists():
        cmd += ["-c", str(constraints)]
    print(f"[bench] installing the TRL peer: {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def _side(ctx: Context, label: str, fn: Callable[[], Any]) -> tuple[Any, str, str]:
    """Runs one side of a row: (result, status, note). Errors are printed and counted, never hidden."""
    try:
        return fn(), "ok", ""
    except NotAvailable as e:
        return None, "not available", f"{label}: {e}"
    except Exception as e:  # a benchmark side crashed: report it in the row and fail the run at the end
        ctx.errors += 1
        print(f"[bench] {label} raised:", file=sys.stderr)
        traceback.print_exc()
        return None, "error", f"{label}: {type(e).__name__}: {e}"


def _row_status(*sides: tuple[str, str]) -> tuple[str, str]:
    statuses = [s for s, _ in sides]
    notes = [n for _, n in sides if n]
    if "error" in statuses:
        return "error", "; ".join(notes)
    if "not available" in statuses:
        return "not available", "; ".join(notes)
    return "ok", ""


def in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh Python process (spawned, not forked); its result or its exception.

    The PyTorch/TRL peers run this way: a peer in this process would share it with JAX's heap and
    thread pools. That is not a hypothetical cost: TRL's ``PPOTrainer`` calls ``gc.collect()`` twice
    per iteration, and after our side has run here a collection walks several hundred thousand
    more live objects (0.33 s each instead of ~0.1 s, ``benchmarks/README.md``). ``fn`` must be
    importable by name (a module-level function) and its arguments and result picklable.
    """
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _ours(name: str):
    """The JAX side module; NotAvailable when rlhf_jax cannot be imported at all."""
    from benchmarks import jax_side

    return getattr(jax_side, name)


def _peer_cpu_only(ctx: Context) -> None:
    if ctx.platform != "cpu":
        raise NotAvailable("the PyTorch peer here is the CPU build of torch; no GPU peer is run")


# ---------------------------------------------------------------- items

def _step_measure(ctx: Context, shape_name: str, kind: str) -> dict[str, Any]:
    """Our SFT (``kind="sft"``) or reward-model (``"rm"``) step and the PyTorch loop's on the same batch,
    measured once per shape and kind (``sft``/``rm`` and ``mfu`` all read it)."""
    cache = ctx.sft_cache if kind == "sft" else ctx.rm_cache
    if shape_name in cache:
        return cache[shape_name]
    from benchmarks import torch_side

    wl = ctx.workload
    shape = shapes.get_shape(shape_name)
    if kind == "sft":
        batch, ours_fn, peer_fn = (data.sft_batch(shape["vocab_size"], wl.sft_batch, wl.sft_seq), "sft_step_time",
                                   torch_side.sft_step_time)
        tokens = wl.sft_batch * wl.sft_seq
    else:
        batch, ours_fn, peer_fn = (data.preference_batch(shape["vocab_size"], wl.rm_pairs, wl.rm_seq),
                                   "reward_step_time", torch_side.reward_step_time)
        tokens = 2 * wl.rm_pairs * wl.rm_seq
    probe = ctx.probe()
    reps = _reps(ctx, shape_name)
    ours, s1, n1 = _side(ctx, "rlhf_jax", lambda: _ours(ours_fn)(shape, batch, dtype=ctx.dtype, reps=reps,
                                                                 attention_impl=ctx.attention_impl))
    peer, s2, n2 = _side(ctx, "pytorch loop",
                         lambda: (_peer_cpu_only(ctx), in_child(peer_fn, shape, batch, reps=reps))[1])
    out = dict(shape=shape, ours=ours, peer=peer, status=_row_status((s1, n1), (s2, n2)), probe=probe, tokens=tokens)
    if kind == "sft":
        out["ours_status"] = (s1, n1)
    cache[shape_name] = out
    return out


def _sft_measure(ctx: Context, shape_name: str) -> dict[str, Any]:
    return _step_measure(ctx, shape_name, "sft")


def _attention_note(ctx: Context, ours: dict[str, Any] | None) -> str:
    """``attention_impl=auto (cudnn)``: the option and what it resolved to for this step."""
    resolved = (ours or {}).get("attention")
    return f"attention_impl={ctx.attention_impl}" + (f" ({resolved})" if resolved and resolved != ctx.attention_impl
                                                      else "")


def _reps(ctx: Context, shape_name: str) -> int:
    if ctx.reps:
        return ctx.reps
    if ctx.quick:
        return 2
    return 3 if shape_name in ("gpt2", "llama1b") else 5


def item_sft(ctx: Context, shape_names: list[str]) -> list[Row]:
    rows = []
    for name in shape_names:
        m = _sft_measure(ctx, name)
        tok = m["tokens"]
        ours = tok / m["ours"]["timing"].median if m["ours"] else None
        peer = tok / m["peer"]["timing"].median if m["peer"] else None
        status, note = m["status"]
        rows.append(Row(
            item="sft", shape=name, metric="train tokens/s", ours=ours, peer=peer, peer_name="PyTorch loop",
            higher_is_better=True, target=TARGETS["sft"], status=status,
            note=note or (f"batch {ctx.workload.sft_batch}x{ctx.workload.sft_seq}, fwd+bwd+AdamW, {ctx.dtype}, "
                         f"{_attention_note(ctx, m['ours'])}"),
            probe_gflops=m["probe"],
            details={"ours": m["ours"], "peer": m["peer"]},
        ))
        rows.append(_sft_trainer_row(ctx, name, m))
    return rows


def _sft_trainer_row(ctx: Context, name: str, m: dict[str, Any]) -> Row:
    """Our SFT step (measured just before) against trl's SFTTrainer on the same rows."""
    from benchmarks import torch_side

    wl = ctx.workload
    batch = data.sft_batch(m["shape"]["vocab_size"], wl.sft_batch, wl.sft_seq)

    def peer_fn():
        _peer_cpu_only(ctx)
        ensure_trl(ctx.allow_install)
        return in_child(torch_side.sft_trainer_step_time, m["shape"], batch, reps=_reps(ctx, name))

    probe = ctx.probe()
    peer, s2, n2 = _side(ctx, "trl SFTTrainer", peer_fn)
    status, note = _row_status(m["status"], (s2, n2))
    tok = m["tokens"]
    return Row(
        item="sft", shape=name, metric="train tokens/s", higher_is_better=True,
        ours=tok / m["ours"]["timing"].median if m["ours"] else None,
        peer=tok / peer["timing"].median if peer else None,
        peer_name=f"trl {TRL_VERSION} SFTTrainer", target=TARGETS["sft"], status=status,
        note=note or "same rows; SFTTrainer's defaults (per-step accuracy/entropy metrics), fp32, no checkpointing",
        probe_gflops=probe, details={"ours": m["ours"], "peer": peer},
    )


def _rm_measure(ctx: Context, shape_name: str) -> dict[str, Any]:
    return _step_measure(ctx, shape_name, "rm")


def item_rm(ctx: Context, shape_names: list[str]) -> list[Row]:
    rows = []
    wl = ctx.workload
    for name in shape_names:
        m = _rm_measure(ctx, name)
        ours, peer = m["ours"], m["peer"]
        status, note = m["status"]
        rows.append(Row(
            item="rm", shape=name, metric="pairs/s", higher_is_better=True,
            ours=wl.rm_pairs / ours["timing"].median if ours else None,
            peer=wl.rm_pairs / peer["timing"].median if peer else None,
            peer_name="PyTorch loop", target=TARGETS["rm"], status=status,
            note=note or (f"{wl.rm_pairs} pairs x {wl.rm_seq}, Bradley-Terry, fwd+bwd+AdamW, {ctx.dtype}, "
                          f"{_attention_note(ctx, ours)}"),
            probe_gflops=m["probe"], details={"ours": ours, "peer": peer},
        ))
    return rows


def _mfu_target(ctx: Context, name: str) -> float:
    if ctx.platform == "cpu":
        return TARGETS["mfu_cpu"]
    return TARGETS.get(("mfu_gpu", name), TARGETS["mfu_gpu"])


def item_mfu(ctx: Context, shape_names: list[str]) -> list[Row]:
    """SFT-step and reward-model-step MFU: model FLOPs of the step / its time / the peak, ours and the
    PyTorch loop's (the steps measured by ``sft`` and ``rm``, or here if those did not run)."""
    rows = []
    for name in shape_names:
        for metric, m, count, seq in (
                ("SFT-step MFU", _sft_measure(ctx, name), "flops_per_token", ctx.workload.sft_seq),
                ("RM-step MFU", _rm_measure(ctx, name), "reward_flops_per_token", ctx.workload.rm_seq)):
            status, note = m["status"]
            fpt, s0, n0 = _side(ctx, "FLOP count", lambda: _ours(count)(m["shape"], seq))
            if s0 != "ok":
                status, note = _row_status((status, note), (s0, n0))
            flops = fpt * m["tokens"] if fpt else None
            ours = flops / m["ours"]["timing"].median / ctx.peak_flops if m["ours"] and flops else None
            peer = flops / m["peer"]["timing"].median / ctx.peak_flops if m["peer"] and flops else None
            source = ("rlhf_jax.models.flops_per_token" if count == "flops_per_token" else
                      "rlhf_jax.models.flops_per_token less the LM head a scalar-head model does not have")
            rows.append(Row(
                item="mfu", shape=name, metric=metric, ours=ours, peer=peer, peer_name="PyTorch loop",
                higher_is_better=True, target=_mfu_target(ctx, name), target_on="ours", status=status,
                note=note or (f"FLOPs/step {flops / 1e9:,.1f} G ({source}) over the peak "
                              f"{ctx.peak_flops / 1e9:,.0f} GFLOP/s ({ctx.peak_source})"),
                probe_gflops=m["probe"],
                details={"flops_per_step": flops, "peak_flops": ctx.peak_flops, "peak_source": ctx.peak_source},
            ))
    return rows


def item_gen(ctx: Context, shape_names: list[str]) -> list[Row]:
    """New tokens/s of ``generation.generate`` per shape and batch (``ctx.gen_batches``), and its decode step
    against the bandwidth floor at the first batch. Our weights are stored in the compute dtype (bf16
    on a GPU: ``param_dtype="bfloat16"``, so the floor counts bf16 weight bytes); on CPU in float32, the
    same weights as transformers'."""
    rows = []
    wl = ctx.workload
    batches = ctx.gen_batches or (wl.gen_batch,)
    if importlib.util.find_spec("benchmarks.bench_generate") is None:
        for name in shape_names:
            rows.append(Row(item="gen", shape=name, metric="new tokens/s", ours=None, peer=None,
                            peer_name="transformers generate", higher_is_better=True,
                            target=TARGETS.get(("gen", name)), status="not available",
                            note="benchmarks/bench_generate.py (the generation issue's benchmark) is not in this tree"))
        return rows
    from benchmarks import bench_generate

    for name in shape_names:
        for i, batch in enumerate(batches):
            first = i == 0
            probe = ctx.probe()
            modes = bench_generate.MODES if first else ("greedy",)
            res, status, note = _side(ctx, "generation benchmark", lambda: bench_generate.run(
                shape=shapes.get_shape(name), batch=batch, prompt_len=wl.gen_prompt, new_tokens=wl.gen_new,
                reps=_reps(ctx, name), dtype=ctx.dtype, param_dtype=ctx.dtype, with_peer=ctx.platform == "cpu",
                copy_bandwidth=ctx.copy_bandwidth, hbm_bytes_per_s=ctx.hbm_bytes_per_s, modes=modes,
                decode_step=first, attention_impl=ctx.attention_impl,
            ))
            rows.extend(_gen_rows(ctx, name, batch, modes, first, res, status, note, probe))
    return rows


def _gen_rows(ctx: Context, name: str, batch: int, modes, decode: bool, res, status: str, note: str,
              probe: float) -> list[Row]:
    """The rows of one ``bench_generate.run`` result: one per mode, and with ``decode`` the decode step."""
    wl = ctx.workload
    rows = []
    for mode in modes:
        r = (res or {}).get("modes", {}).get(mode) or {}
        row_status, row_note = status, note
        if status == "ok" and ctx.platform != "cpu":
            row_status, row_note = "not available", "transformers peer: the PyTorch here is a CPU build"
        desc = (f"batch {batch}, prompt {wl.gen_prompt}, {wl.gen_new} new tokens, full length, weights "
                f"{ctx.dtype}")
        if res and mode == "greedy" and "decode_step_s" in res:
            desc += (f"; decode step {res['decode_step_s'] * 1e3:.2f} ms vs bandwidth floor "
                     f"{res['floor_step_s'] * 1e3:.2f} ms ({res['step_over_floor']:.2f}x the floor)")
            if "matmul_step_s_ours" in res:
                desc += (f"; its weight matmuls alone, one after the other, take "
                         f"{res['matmul_step_s_ours'] * 1e3:.2f} ms in XLA, "
                         f"{res['matmul_step_s_torch'] * 1e3:.2f} ms in PyTorch")
        metric = f"new tokens/s ({mode})" if batch == wl.gen_batch else f"new tokens/s ({mode}, batch {batch})"
        rows.append(Row(
            item="gen", shape=name, metric=metric, higher_is_better=True,
            ours=r.get("ours_tokens_per_s"), peer=r.get("peer_tokens_per_s"),
            peer_name="transformers generate", target=TARGETS.get(("gen", name)), status=row_status,
            note=row_note or desc, probe_gflops=probe,
            details={**r, **{k: v for k, v in (res or {}).items() if k != "modes"}},
        ))
    if decode:
        floor_x = TARGETS["decode_floor_cpu" if ctx.platform == "cpu" else "decode_floor_gpu"]
        bw = "HBM bandwidth (data sheet)" if ctx.hbm_bytes_per_s else "measured copy bandwidth"
        rows.append(Row(
            item="gen", shape=name, metric=f"decode step ms (batch {batch})", higher_is_better=False,
            ours=res["decode_step_s"] * 1e3 if res else None, peer=res["floor_step_s"] * 1e3 if res else None,
            peer_name="bandwidth floor", target=round(1.0 / floor_x, 3), status=status,
            note=note or (f"(t({wl.gen_new} new) - t(1 new)) / {wl.gen_new - 1} per step vs the bytes it must read "
                          f"(weights {res['weight_bytes'] / 1e9:.2f} GB in {ctx.dtype} + average KV cache "
                          f"{res['kv_bytes_avg'] / 1e9:.3f} GB) / {bw}; ratio = floor / step, target: step "
                          f"<= {floor_x:g}x the floor"),
            probe_gflops=probe, details={k: v for k, v in (res or {}).items() if k != "modes"},
        ))
    return rows


def _tiny_name(shape_names: list[str]) -> str:
    return "micro" if "micro" in shape_names else "tiny"


def item_ppo(ctx: Context, shape_names: list[str]) -> list[Row]:
    from benchmarks import torch_side

    wl = ctx.workload
    name = _tiny_name(shape_names)
    shape = shapes.get_shape(name)
    p = data.prompts(shape["vocab_size"], wl.ppo_batch, wl.ppo_prompt)
    iters = 3 if ctx.quick else 4
    probe = ctx.probe()
    kw = dict(response_length=wl.ppo_response, epochs=wl.ppo_epochs, minibatches=wl.ppo_minibatches)
    ours, s1, n1 = _side(ctx, "rlhf_jax", lambda: _ours("ppo_iteration_time")(
        shape, p, iterations=iters, dtype=ctx.dtype, attention_impl=ctx.attention_impl, **kw))

    def peer_fn():
        _peer_cpu_only(ctx)
        ensure_trl(ctx.allow_install)
        return in_child(torch_side.trl_ppo_iteration_time, shape, p["prompt_ids"], iterations=iters, **kw)

    peer, s2, n2 = _side(ctx, "trl PPOTrainer", peer_fn)
    status, note = _row_status((s1, n1), (s2, n2))
    floor = ppo_compute_floor(shape, wl, ctx.peak_flops)
    extra = ""
    if floor and peer:
        extra = (f"; compute floor {floor['floor_s']:.2f} s ({floor['flops'] / 1e9:,.0f} GFLOP at the matmul peak), "
                 f"so no implementation can beat the peer by more than {peer['median_s'] / floor['floor_s']:.1f}x here")
    return [Row(
        item="ppo", shape=name, metric="s/iteration", higher_is_better=False,
        ours=ours["median_s"] if ours else None, peer=peer["median_s"] if peer else None,
        peer_name=f"trl {TRL_VERSION} PPOTrainer", target=TARGETS["ppo"], status=status,
        note=note or (f"{wl.ppo_batch} prompts x {wl.ppo_prompt}, {wl.ppo_response} sampled tokens, "
                      f"{wl.ppo_epochs} epochs x {wl.ppo_minibatches} minibatch; 4 models" + extra),
        probe_gflops=probe, details={"ours": ours, "peer": peer, "compute_floor": floor},
    )]


def ppo_compute_floor(shape: dict, wl, peak_flops: float) -> dict | None:
    """FLOPs one PPO iteration must do, whoever runs it, and that work's time at ``peak_flops``.

    Per token of the ``batch x (prompt + response)`` sequences (``models.flops_per_token``, PaLM
    convention): the rollout and the reference pass (2 policy forwards), the reward and old-value
    passes (2 forwards of the policy trunk without its LM head), and ``epochs`` training passes of
    the policy and of the value model. Counted generously for the peer: the policy's LM head on
    every position, the decode as one forward over the sequence (no per-step overhead).
    """
    try:
        cfg = _ours("model_config")(shape, "float32")
    except NotAvailable:  # the library piece is missing from the tree: no floor, the row still stands
        return None
    fpt = _ours("flops_per_token")
    seq = wl.ppo_prompt + wl.ppo_response
    head_inf, head_train = 2.0 * cfg.hidden_size * cfg.vocab_size, 6.0 * cfg.hidden_size * cfg.vocab_size
    pol_inf = fpt(shape, seq, training=False)
    pol_train = fpt(shape, seq, training=True)
    per_token = 2 * pol_inf + 2 * (pol_inf - head_inf) + wl.ppo_epochs * (pol_train + pol_train - head_train)
    flops = per_token * wl.ppo_batch * seq
    return {"flops": flops, "floor_s": flops / peak_flops, "peak_flops": peak_flops}


def item_sweep(ctx: Context, shape_names: list[str]) -> list[Row]:
    wl = ctx.workload
    name = _tiny_name(shape_names)
    shape = shapes.get_shape(name)
    p = data.prompts(shape["vocab_size"], wl.ppo_batch, wl.ppo_prompt)
    probe = ctx.probe()
    res, status, note = _side(ctx, "rlhf_jax", lambda: _ours("sweep_time")(
        shape, p, n_runs=wl.sweep_runs, iterations=wl.sweep_iterations, response_length=wl.ppo_response,
        epochs=wl.ppo_epochs, minibatches=wl.ppo_minibatches, dtype=ctx.dtype, reps=1 if ctx.quick else 2,
        attention_impl=ctx.attention_impl))
    n = wl.sweep_runs
    return [Row(
        item="sweep", shape=name, metric="PPO iterations/s", higher_is_better=True,
        ours=res["vmapped_iters_per_s"] if res else None, peer=res["sequential_iters_per_s"] if res else None,
        peer_name=f"{n} sequential runs (rlhf_jax)", target=TARGETS["sweep_fraction"] * n, status=status,
        note=note or (f"N={n} seeds x kl_coef values vmapped in one program vs the same N runs one after "
                      f"another; ratio = N·t(one)/t(N vmapped), target 0.7·N"),
        probe_gflops=probe, details=res or {},
    )]


def item_tunix(ctx: Context, shape_names: list[str]) -> list[Row]:
    from benchmarks import tunix_env

    wl = ctx.workload
    name = _tiny_name(shape_names)
    shape = shapes.get_shape(name)
    p = data.prompts(shape["vocab_size"], wl.gen_batch, wl.gen_prompt)
    probe = ctx.probe()
    reps = _reps(ctx, name)
    ours, s1, n1 = _side(ctx, "rlhf_jax", lambda: _ours("generate_time")(
        shape, p, new_tokens=wl.gen_new, greedy=True, reps=reps, dtype=ctx.dtype, attention_impl=ctx.attention_impl))

    def peer_fn():
        if ctx.platform != "cpu":
            raise NotAvailable("Tunix's venv holds the CPU build of JAX; no GPU Tunix run")
        return tunix_env.sampler_time(ctx.tunix_venv, shape, p["prompt_ids"], new_tokens=wl.gen_new, reps=reps,
                                      allow_install=ctx.allow_install)

    peer, s2, n2 = _side(ctx, "tunix", peer_fn)
    status, note = _row_status((s1, n1), (s2, n2))
    new = wl.gen_batch * wl.gen_new
    return [Row(
        item="tunix", shape=name, metric="new tokens/s (greedy)", higher_is_better=True,
        ours=new / ours["timing"].median if ours else None,
        peer=new / peer["median_s"] if peer else None,
        peer_name=f"tunix {tunix_env.TUNIX_VERSION} vanilla sampler", target=TARGETS["tunix"], status=status,
        note=note or f"batch {wl.gen_batch}, prompt {wl.gen_prompt}, {wl.gen_new} new tokens, greedy, full length",
        probe_gflops=probe, details={"ours": ours, "peer": peer},
    )]


def _sft_variant_row(ctx: Context, name: str, *, item: str, label: str, peer_name: str, variant: dict,
                     variant_is_ours: bool, note: str) -> Row:
    """Our SFT step as measured by ``sft`` (``_sft_measure``) against the same step with one option changed.

    ``variant_is_ours``: the changed step is the row's "rlhf_jax" side (chunk: chunked vs whole logits),
    else its "peer" side (attn: ``attention_impl=xla`` vs ours), so the ratio is the option's speed-up.
    """
    m = _sft_measure(ctx, name)
    probe = ctx.probe()
    v, s2, n2 = _side(ctx, label, lambda: _ours("sft_step_time")(
        m["shape"], data.sft_batch(m["shape"]["vocab_size"], ctx.workload.sft_batch, ctx.workload.sft_seq),
        dtype=ctx.dtype, reps=_reps(ctx, name), **variant))
    base = m["ours"]
    status, err = _row_status(m["ours_status"], (s2, n2))
    tok = m["tokens"]
    rate = lambda x: tok / x["timing"].median if x else None  # noqa: E731
    mine, other = (v, base) if variant_is_ours else (base, v)
    gib = lambda x: f"{x['temp_bytes'] / 2**30:.2f} GiB" if x.get("temp_bytes") is not None else "?"  # noqa: E731
    details = {"ours": mine, "peer": other}
    if status == "ok":
        details["first_loss_abs_diff"] = abs(mine["first_loss"] - other["first_loss"])
        note = (f"{note}; first-step loss {mine['first_loss']:.6g} vs {other['first_loss']:.6g} (same weights and "
                f"batch; |diff| {details['first_loss_abs_diff']:.2g}); XLA temp buffers {gib(mine)} vs {gib(other)}; "
                f"batch {ctx.workload.sft_batch}x{ctx.workload.sft_seq}, {ctx.dtype}")
    return Row(
        item=item, shape=name, metric="SFT train tokens/s", higher_is_better=True, ours=rate(mine), peer=rate(other),
        peer_name=peer_name, status=status, note=err or note, probe_gflops=probe, details=details,
    )


def item_attn(ctx: Context, shape_names: list[str]) -> list[Row]:
    """What the attention option buys: our SFT step (``--attention-impl``, default auto = cuDNN on a GPU)
    against the same step with ``attention_impl=xla`` (one masked einsum over ``[T, S]``)."""
    rows = []
    for name in shape_names:
        rows.append(_sft_variant_row(
            ctx, name, item="attn", label="rlhf_jax attention_impl=xla", peer_name="same step, attention_impl=xla",
            variant={"attention_impl": "xla"}, variant_is_ours=False,
            note=f"ours: {_attention_note(ctx, _sft_measure(ctx, name)['ours'])}"))
    return rows


def item_chunk(ctx: Context, shape_names: list[str]) -> list[Row]:
    """What chunked logits cost or buy: the SFT step with ``SFTStepConfig(logits_chunk=--logits-chunk)``
    (never the whole ``[B, T, V]`` logits) against our step with whole logits."""
    c = ctx.logits_chunk
    rows = []
    for name in shape_names:
        rows.append(_sft_variant_row(
            ctx, name, item="chunk", label=f"rlhf_jax logits_chunk={c}", peer_name="same step, whole logits",
            variant={"attention_impl": ctx.attention_impl, "logits_chunk": c}, variant_is_ours=True,
            note=f"ours: logits_chunk={c} positions per chunk"))
    return rows


def item_rl(ctx: Context, shape_names: list[str]) -> list[Row]:
    """The fused PPO and GRPO iterations (``rlhf_jax.rl.iteration``) at each shape, random weights, no peer:
    seconds per iteration, the rollout's share of it, and the iteration's MFU (model FLOPs of all its
    forwards and backwards, ``rl.trainer.run_flops``, over the peak)."""
    wl = ctx.workload
    rows = []
    algos = (("ppo", wl.rl_ppo_prompts, 1, wl.rl_ppo_epochs), ("grpo", wl.rl_grpo_prompts, wl.rl_group, wl.rl_grpo_epochs))
    iterations = (ctx.reps + 1) if ctx.reps else 3
    for name in shape_names:
        shape = shapes.get_shape(name)
        for algo, n_prompts, group, epochs in algos:
            p = data.prompts(shape["vocab_size"], n_prompts, wl.rl_prompt)
            probe = ctx.probe()
            res, status, note = _side(ctx, f"rlhf_jax {algo}", lambda: _ours("rl_iteration_time")(
                shape, p, algo=algo, response_length=wl.rl_response, epochs=epochs, minibatches=wl.rl_minibatches,
                group_size=group, iterations=max(iterations, 2), rollout_reps=max(1, iterations - 1),
                dtype=ctx.dtype, attention_impl=ctx.attention_impl))
            rows.extend(_rl_rows(ctx, name, algo, n_prompts, group, epochs, res, status, note, probe))
    return rows


def _rl_rows(ctx: Context, name: str, algo: str, n_prompts: int, group: int, epochs: int, res, status: str,
             note: str, probe: float) -> list[Row]:
    wl = ctx.workload
    up = algo.upper()
    rows_n = n_prompts * group
    models = "policy, reference, reward model, value model" if algo == "ppo" else "policy, reference, reward model"
    forwards = "policy/reference/value" if algo == "ppo" else "policy/reference"
    n_epochs = f"{epochs} epoch{'' if epochs == 1 else 's'}"
    what = (f"{n_prompts} prompts" + (f" x G {group}" if group > 1 else "") + f" = {rows_n} rows of "
            f"{wl.rl_prompt} + {wl.rl_response} sampled tokens, {n_epochs} x {wl.rl_minibatches} minibatches; "
            f"{models}; {ctx.dtype} compute, float32 params for the trained models, reference and reward model "
            f"stored in {ctx.dtype}, attention_impl={ctx.attention_impl}")
    sec = res["median_s"] if res else None
    share = res["rollout_share"] if res else None
    mfu = res["flops"] / res["median_s"] / ctx.peak_flops if res else None
    out = [Row(item="rl", shape=name, metric=f"{up} s/iteration", ours=sec, peer=None, peer_name="",
               higher_is_better=False, status=status, probe_gflops=probe,
               note=note or (f"one compiled program ({algo}_iteration), state donated, first call "
                             f"{res['first_call_s']:.1f} s (compile) excluded; {what}"),
               details=res or {})]
    out.append(Row(
        item="rl", shape=name, metric=f"{up} rollout share", ours=share, peer=None, peer_name="",
        higher_is_better=False, status=status, probe_gflops=probe,
        note=note or (f"rl.rollout alone (sampling + {forwards} forwards) {res['rollout_s']:.3g} s of the "
                      f"iteration's {sec:.3g} s; the other {sec - res['rollout_s']:.3g} s: reward forward, advantages, "
                      f"{res['updates']} updates")))
    out.append(Row(
        item="rl", shape=name, metric=f"{up} iteration MFU", ours=mfu, peer=None, peer_name="",
        higher_is_better=True, target=TARGETS["rl_mfu_grpo"] if algo == "grpo" and ctx.platform != "cpu" else None,
        target_on="ours", status=status, probe_gflops=probe,
        note=note or (f"model FLOPs/iteration {res['flops'] / 1e12:,.2f} T (rl.trainer.run_flops: sampling, "
                      f"every rollout forward, {n_epochs} of training) over the peak "
                      f"{ctx.peak_flops / 1e9:,.0f} GFLOP/s ({ctx.peak_source})")))
    return out


ITEM_FNS = {"sft": item_sft, "rm": item_rm, "gen": item_gen, "ppo": item_ppo, "sweep": item_sweep,
            "mfu": item_mfu, "tunix": item_tunix, "rl": item_rl, "attn": item_attn, "chunk": item_chunk}


def run(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Runs the selected items, prints the table, writes latest.json/latest.md. 0 unless a side raised.

    ``command`` is the command line recorded in the report (default: ``python -m benchmarks.run``
    with this process's arguments).
    """
    import jax

    items = _items(args.only)
    platform = jax.devices()[0].platform
    if args.shapes:
        shape_names = [s.strip() for s in args.shapes.split(",") if s.strip()]
        for s in shape_names:
            shapes.get_shape(s)
    elif args.quick:
        shape_names = ["tiny"]
    else:
        shape_names = ["tiny", "gpt2"] if platform == "cpu" else ["gpt2", "llama1b"]
    workload = shapes.get_workload(args.workload)
    item_shapes = {item: _item_shapes(args.item_shapes).get(item, shape_names) for item in items}
    gen_batches = _batches(args.gen_batches, workload.gen_batch)
    if args.logits_chunk < 1:
        raise SystemExit(f"--logits-chunk: expected a positive number of positions, got {args.logits_chunk}")
    print(f"[bench] platform {platform}; items {items}; shapes {item_shapes}; probing the machine ...",
          file=sys.stderr, flush=True)
    probe = probes.full_probe(platform, quick=args.quick)
    hbm = None
    if platform == "cpu":
        peak, peak_source = probe["matmul_peak_flops"], "measured matmul peak"
    else:
        kind = jax.devices()[0].device_kind
        table = probes.lookup_gpu_peak(kind)
        if args.peak_tflops:
            peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
        elif table:
            peak, peak_source = table[0] * 1e12, f"data-sheet dense bf16 peak of {kind}"
        else:
            peak, peak_source = probe["matmul_peak_flops"], f"measured bf16 matmul ({kind} not in the table)"
        if args.hbm_tbps:
            hbm = args.hbm_tbps * 1e12
        elif table:
            hbm = table[1] * 1e12
        probe["peak_flops_used"] = peak
    ctx = Context(
        quick=args.quick, workload=workload, platform=platform,
        dtype="float32" if platform == "cpu" else "bfloat16", reps=args.reps or 0,
        peak_flops=peak, peak_source=peak_source, hbm_bytes_per_s=hbm,
        allow_install=not args.no_install, tunix_venv=Path(args.tunix_venv),
        copy_bandwidth=probe["copy_bandwidth_bytes_per_s"], attention_impl=args.attention_impl,
        gen_batches=gen_batches, logits_chunk=args.logits_chunk,
    )
    machine = _machine(platform)
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or " ".join(["python -m benchmarks.run"] + sys.argv[1:]),
        "machine": machine,
        "probes": probe,
        "quick": bool(args.quick),
        "dtype": ctx.dtype,
        "attention_impl": ctx.attention_impl,
        "workload": dataclasses.asdict(workload),
        "shapes": {n: shapes.get_shape(n) for names in item_shapes.values() for n in names},
        "item_shapes": item_shapes,
        "gen_batches": list(gen_batches),
        "logits_chunk": ctx.logits_chunk,
        "item_seconds": {},
        "complete": False,
    }
    rows: list[Row] = []
    for item in items:
        print(f"[bench] {item} ({', '.join(item_shapes[item])}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        new = ITEM_FNS[item](ctx, item_shapes[item])
        result["item_seconds"][item] = round(time.perf_counter() - t0, 1)
        print(f"[bench]   {item}: {result['item_seconds'][item]:.1f} s (compilation included)", file=sys.stderr,
              flush=True)
        for r in new:
            print(f"[bench]   {r.item}/{r.shape} {r.metric}: ours {report.fmt_value(r.ours)} "
                  f"peer {report.fmt_value(r.peer)} ratio {report.fmt_value(r.ratio)} [{r.status}]",
                  file=sys.stderr, flush=True)
        rows.extend(new)
        # Written after every item, so an interrupted run still leaves what it measured.
        report.write_results(args.out, result, rows)
    result["complete"] = True
    json_path, md_path = report.write_results(args.out, result, rows)
    print(report.render_markdown(result, rows))
    print(f"[bench] wrote {json_path} and {md_path}", file=sys.stderr)
    if ctx.errors:
        print(f"[bench] {ctx.errors} benchmark side(s) raised; see the tracebacks above", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parser.parse_args(argv), command=" ".join(["python -m benchmarks.run", *argv]))


if __name__ == "__main__":
    sys.exit(main())
