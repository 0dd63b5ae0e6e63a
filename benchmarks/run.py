"""The benchmark suite: ``python -m benchmarks.run`` / ``rlhf-jax bench`` / ``make bench``.

For each item it builds the same shapes with random weights in rlhf_jax and in the peer
(transformers/TRL on PyTorch CPU, Tunix in its own venv), runs both back to back in this process
tree (Tunix in a child process), and prints a Markdown table with absolute figures and speed-up
ratios; ``latest.json`` and ``latest.md`` go to ``--out`` (default ``benchmarks/results``).

Items (``--only``): sft, rm, gen, ppo, sweep, mfu, tunix. Shapes: tiny and gpt2 on CPU
(``--quick``: tiny only, fewer repetitions); on a GPU (bf16) gpt2 and llama1b.
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
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks import data, probes, report, shapes
from benchmarks.errors import NotAvailable
from benchmarks.report import Row

ITEMS = ("sft", "rm", "gen", "ppo", "sweep", "mfu", "tunix")
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
}


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
    sft_cache: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: int = 0

    def probe(self) -> float:
        return probes.quick_probe(self.platform) / 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's options (shared by ``python -m benchmarks.run`` and ``rlhf-jax bench``)."""
    parser.add_argument("--quick", action="store_true", help="tiny shape only, few repetitions")
    parser.add_argument(
        "--only", default=",".join(ITEMS), help=f"comma-separated items to run, from: {','.join(ITEMS)}"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for latest.json and latest.md")
    parser.add_argument(
        "--shapes", default=None,
        help="comma-separated shapes for sft/rm/gen/mfu (default: tiny,gpt2 on CPU, gpt2,llama1b on GPU; "
        "--quick: tiny); ppo, sweep and tunix always use the first shape that is tiny or micro",
    )
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

def _sft_measure(ctx: Context, shape_name: str) -> dict[str, Any]:
    if shape_name in ctx.sft_cache:
        return ctx.sft_cache[shape_name]
    from benchmarks import torch_side

    wl = ctx.workload
    shape = shapes.get_shape(shape_name)
    batch = data.sft_batch(shape["vocab_size"], wl.sft_batch, wl.sft_seq)
    probe = ctx.probe()
    reps = _reps(ctx, shape_name)
    ours, s1, n1 = _side(ctx, "rlhf_jax", lambda: _ours("sft_step_time")(shape, batch, dtype=ctx.dtype, reps=reps,
                                                                     attention_impl=ctx.attention_impl))
    peer, s2, n2 = _side(
        ctx, "pytorch loop", lambda: (_peer_cpu_only(ctx), in_child(torch_side.sft_step_time, shape, batch, reps=reps))[1]
    )
    out = dict(shape=shape, ours=ours, peer=peer, status=_row_status((s1, n1), (s2, n2)), probe=probe,
               tokens=wl.sft_batch * wl.sft_seq)
    ctx.sft_cache[shape_name] = out
    return out


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
                         f"attention_impl={ctx.attention_impl}"),
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


def item_rm(ctx: Context, shape_names: list[str]) -> list[Row]:
    from benchmarks import torch_side

    rows = []
    wl = ctx.workload
    for name in shape_names:
        shape = shapes.get_shape(name)
        batch = data.preference_batch(shape["vocab_size"], wl.rm_pairs, wl.rm_seq)
        probe = ctx.probe()
        reps = _reps(ctx, name)
        ours, s1, n1 = _side(ctx, "rlhf_jax",
                             lambda: _ours("reward_step_time")(shape, batch, dtype=ctx.dtype, reps=reps,
                                                               attention_impl=ctx.attention_impl))
        peer, s2, n2 = _side(
            ctx, "pytorch loop",
            lambda: (_peer_cpu_only(ctx), in_child(torch_side.reward_step_time, shape, batch, reps=reps))[1],
        )
        status, note = _row_status((s1, n1), (s2, n2))
        rows.append(Row(
            item="rm", shape=name, metric="pairs/s", higher_is_better=True,
            ours=wl.rm_pairs / ours["timing"].median if ours else None,
            peer=wl.rm_pairs / peer["timing"].median if peer else None,
            peer_name="PyTorch loop", target=TARGETS["rm"], status=status,
            note=note or (f"{wl.rm_pairs} pairs x {wl.rm_seq}, Bradley-Terry, fwd+bwd+AdamW, {ctx.dtype}, "
                          f"attention_impl={ctx.attention_impl}"),
            probe_gflops=probe, details={"ours": ours, "peer": peer},
        ))
    return rows


def item_mfu(ctx: Context, shape_names: list[str]) -> list[Row]:
    rows = []
    for name in shape_names:
        m = _sft_measure(ctx, name)
        status, note = m["status"]
        fpt, s0, n0 = _side(ctx, "FLOP count", lambda: _ours("flops_per_token")(m["shape"], ctx.workload.sft_seq))
        if s0 != "ok":
            status, note = _row_status((status, note), (s0, n0))
        flops = fpt * m["tokens"] if fpt else None
        ours = flops / m["ours"]["timing"].median / ctx.peak_flops if m["ours"] and flops else None
        peer = flops / m["peer"]["timing"].median / ctx.peak_flops if m["peer"] and flops else None
        target = TARGETS["mfu_cpu"] if ctx.platform == "cpu" else TARGETS["mfu_gpu"]
        rows.append(Row(
            item="mfu", shape=name, metric="SFT-step MFU", ours=ours, peer=peer, peer_name="PyTorch loop",
            higher_is_better=True, target=target, target_on="ours", status=status,
            note=note or (f"FLOPs/step {flops / 1e9:,.1f} G (rlhf_jax.models.flops_per_token) over the peak "
                          f"{ctx.peak_flops / 1e9:,.0f} GFLOP/s ({ctx.peak_source})"),
            probe_gflops=m["probe"],
            details={"flops_per_step": flops, "peak_flops": ctx.peak_flops, "peak_source": ctx.peak_source},
        ))
    return rows


def item_gen(ctx: Context, shape_names: list[str]) -> list[Row]:
    rows = []
    wl = ctx.workload
    if importlib.util.find_spec("benchmarks.bench_generate") is None:
        for name in shape_names:
            rows.append(Row(item="gen", shape=name, metric="new tokens/s", ours=None, peer=None,
                            peer_name="transformers generate", higher_is_better=True,
                            target=TARGETS.get(("gen", name)), status="not available",
                            note="benchmarks/bench_generate.py (the generation issue's benchmark) is not in this tree"))
        return rows
    from benchmarks import bench_generate

    for name in shape_names:
        probe = ctx.probe()
        res, status, note = _side(ctx, "generation benchmark", lambda: bench_generate.run(
            shape=shapes.get_shape(name), batch=wl.gen_batch, prompt_len=wl.gen_prompt, new_tokens=wl.gen_new,
            reps=_reps(ctx, name), dtype=ctx.dtype, with_peer=ctx.platform == "cpu",
            copy_bandwidth=ctx.copy_bandwidth, hbm_bytes_per_s=ctx.hbm_bytes_per_s,
        ))
        modes = res["modes"] if res else {"greedy": None, "sampling": None}
        for mode, r in modes.items():
            r = r or {}
            row_status, row_note = status, note
            if status == "ok" and ctx.platform != "cpu":
                row_status, row_note = "not available", "transformers peer: the PyTorch here is a CPU build"
            desc = f"batch {wl.gen_batch}, prompt {wl.gen_prompt}, {wl.gen_new} new tokens, full length"
            if res and mode == "greedy" and "decode_step_s" in res:
                desc += (f"; decode step {res['decode_step_s'] * 1e3:.2f} ms vs bandwidth floor "
                         f"{res['floor_step_s'] * 1e3:.2f} ms ({res['step_over_floor']:.2f}x the floor)")
                if "matmul_step_s_ours" in res:
                    desc += (f"; its weight matmuls alone, one after the other, take "
                             f"{res['matmul_step_s_ours'] * 1e3:.2f} ms in XLA, "
                             f"{res['matmul_step_s_torch'] * 1e3:.2f} ms in PyTorch")
            rows.append(Row(
                item="gen", shape=name, metric=f"new tokens/s ({mode})", higher_is_better=True,
                ours=r.get("ours_tokens_per_s"), peer=r.get("peer_tokens_per_s"),
                peer_name="transformers generate", target=TARGETS.get(("gen", name)), status=row_status,
                note=row_note or desc, probe_gflops=probe,
                details={**r, **{k: v for k, v in (res or {}).items() if k != "modes"}},
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


ITEM_FNS = {"sft": item_sft, "rm": item_rm, "gen": item_gen, "ppo": item_ppo, "sweep": item_sweep,
            "mfu": item_mfu, "tunix": item_tunix}


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
    print(f"[bench] platform {platform}; items {items}; shapes {shape_names}; probing the machine ...",
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
        "shapes": {n: shapes.get_shape(n) for n in shape_names},
        "complete": False,
    }
    rows: list[Row] = []
    for item in items:
        print(f"[bench] {item} ...", file=sys.stderr, flush=True)
        new = ITEM_FNS[item](ctx, shape_names)
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
