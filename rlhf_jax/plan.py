"""``rlhf-jax plan``: compile a run's programs ahead of time for a named accelerator topology, from any host.

    rlhf-jax plan --config experiments/ppo_llama8b.py --topology v5p-16 [--json plan.json] [KEY=VALUE ...]
    rlhf-jax plan --config experiments/sft_sort_tiny.py --topology cpu:8       # fake CPU devices (tests)

How: the trainer of the config (``rlhf_jax.trainers.TRAINERS``, chosen by the config's class or
``--trainer``) runs its own set-up -- validation, tokenizer, models, optimiser, mesh, placement, the
job -- inside ``rlhf_jax.devices.targeting(topology devices, abstract=True)`` and traced by
``jax.eval_shape``: every check sees the target's device count, the mesh is the target's, the generation
code picks the target platform's paths, models are built from their configs (``config.json`` for a
Hugging Face directory; no weight is read or materialised) and placement yields sharded
``ShapeDtypeStruct``s. The one training loop, seeing a plan, hands back the step's jitted programs with
those inputs instead of running (:class:`rlhf_jax.training.loop.Planned`), and each program is lowered and
compiled for the target by XLA's own compiler (TPU topologies through ``jax.experimental.topologies``,
which needs ``libtpu``: ``pip install 'rlhf_jax[plan]'``). What is reported per program comes from the
compiled executable: its memory analysis (per-device argument, output, temporary and aliased bytes) and
its cost analysis (FLOPs, bytes accessed), beside the model FLOPs counted from the shapes.

Roofline: ``max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth)`` per device, a lower bound on the
step time. XLA's cost analysis counts the body of a ``while``/``scan`` loop once, not once per trip
(the decode loop, the epochs × minibatches scan, micro-batches), so FLOPs are
``max(compiler, model FLOPs / devices)`` and the bytes accessed are a lower bound for looped programs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError, apply_overrides, load_config_file, to_dict
from rlhf_jax.data import load_tokenizer
from rlhf_jax.sweeps.cli import parse_mesh
from rlhf_jax.sweeps.points import parse_grid
from rlhf_jax.sweeps.vmapped import run_vmapped_sweep
from rlhf_jax.trainers import TRAINERS, load
from rlhf_jax.training import loop
from rlhf_jax.training import mesh as mesh_lib
from rlhf_jax.training.common import build_model, get_task_or_none, require_tokenizer_dir

GIB = 1024 ** 3

# Per chip, from the vendors' data sheets: HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth bytes/s.
# ``cores``: TensorCores per chip in the slice name (v4-N and v5p-N count TensorCores, two per chip;
# v5e-N and v6e-N count chips). ``dims``: the topology's dimensions (2D torus or 3D).
TPU_CHIPS: dict[str, dict[str, Any]] = {
    "v4": dict(hbm=32 * GIB, peak=275e12, bw=1.2e12, cores=2, dims=3),
    "v5p": dict(hbm=95 * GIB, peak=459e12, bw=2.765e12, cores=2, dims=3),
    "v5e": dict(hbm=16 * GIB, peak=197e12, bw=0.819e12, cores=1, dims=2),
    "v6e": dict(hbm=32 * GIB, peak=918e12, bw=1.64e12, cores=1, dims=2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named target: its devices (attached or not) and per-device limits."""
    name: str
    platform: str
    devices: tuple
    device_kind: str
    hbm_bytes_per_device: float
    peak_flops_per_device: float
    hbm_bandwidth_per_device: float
    source: str  # where the per-device figures come from

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _tpu_topology(name: str, gen: str, count: int) -> Topology:
    spec = TPU_CHIPS[gen]
    if count % spec["cores"]:
        raise ConfigError(f"--topology {name!r}: {gen}-N counts TensorCores ({spec['cores']} per chip); "
                          f"{count} is not a multiple of {spec['cores']}")
    chips = count // spec["cores"]
    shapes = _SHAPES_2D if spec["dims"] == 2 else _SHAPES_3D
    if chips not in shapes:
        raise ConfigError(f"--topology {name!r}: no {gen} slice of {chips} chips; known sizes: "
                          + ", ".join(f"{gen}-{c * spec['cores']}" for c in shapes))
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise ConfigError(f"--topology {name!r}: jax.experimental.topologies is unavailable ({e})") from None
    try:
        desc = topologies.get_topology_desc(topology_name=f"{gen}:{shapes[chips]}", platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: say how to get it, keep the cause
        raise ConfigError(
            f"--topology {name!r}: cannot describe the TPU topology {gen}:{shapes[chips]} on this host "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}); TPU plans need "
            "libtpu beside jax: pip install 'rlhf_jax[plan]' (or jax[tpu] of the installed jax version)") from e
    devs = tuple(desc.devices)
    per = chips / len(devs)  # chips per device (v4's topology lists each TensorCore as a device)
    return Topology(name=name, platform="tpu", devices=devs, device_kind=str(devs[0].device_kind),
                    hbm_bytes_per_device=spec["hbm"] * per, peak_flops_per_device=spec["peak"] * per,
                    hbm_bandwidth_per_device=spec["bw"] * per,
                    source=f"{gen} data sheet per chip: {spec['hbm'] / GIB:.0f} GiB HBM, "
                           f"{spec['peak'] / 1e12:.0f} TFLOP/s bf16, {spec['bw'] / 1e12:.2f} TB/s")


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpu_probe() -> tuple[float, float]:
    """``(matmul FLOP/s, copy bytes/s)`` of this host, measured (best of a few short runs)."""
    a = jax.numpy.ones((512, 512), jax.numpy.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
    flops = 2 * 512 ** 3 / best
    buf = np.ones(16 * 2 ** 20 // 4, np.float32)
    out = np.empty_like(buf)
    copy = min(_timed(lambda: np.copyto(out, buf)) for _ in range(5))
    return flops, 2 * buf.nbytes / copy


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-9)


def _cpu_topology(name: str, count: int) -> Topology:
    try:
        cpus = jax.devices("cpu")
    except RuntimeError as e:  # pragma: no cover - jax always has a CPU backend
        raise ConfigError(f"--topology {name!r}: no CPU backend ({e})") from None
    if len(cpus) < count:
        raise ConfigError(
            f"--topology {name!r}: this process has {len(cpus)} CPU device(s); start it with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (the rlhf-jax command sets it when "
            "JAX has not started yet)")
    flops, bw = _cpu_probe()
    return Topology(name=name, platform="cpu", devices=tuple(cpus[:count]), device_kind=str(cpus[0].device_kind),
                    hbm_bytes_per_device=host_memory_bytes() / count, peak_flops_per_device=flops / count,
                    hbm_bandwidth_per_device=bw / count,
                    source=f"this host, shared by {count} fake devices: {host_memory_bytes() / GIB:.1f} GiB RAM, "
                           f"measured {flops / 1e9:.0f} GFLOP/s f32 matmul, {bw / 1e9:.1f} GB/s copy")


def parse_topology_name(name: str) -> tuple[str, int]:
    """``("cpu", N)`` or ``(tpu generation, the number in the slice name)``; a ConfigError otherwise."""
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*[-:]\s*(\d+)\s*", name.lower())
    if not m:
        raise ConfigError(f"--topology {name!r}: expected a TPU slice like v5p-64, v5e-16, v4-32, v6e-256, or "
                          "cpu:N (fake CPU devices)")
    gen, count = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if count < 1:
        raise ConfigError(f"--topology {name!r}: the device count must be >= 1")
    if gen != "cpu" and gen not in TPU_CHIPS:
        raise ConfigError(f"--topology {name!r}: unknown accelerator {m.group(1)!r}; known: cpu, "
                          + ", ".join(TPU_CHIPS))
    return gen, count


def topology(name: str) -> Topology:
    """The devices and limits of ``name``: ``v5p-64`` (TensorCores for v4/v5p, chips for v5e/v6e), ``cpu:8``."""
    gen, count = parse_topology_name(name)
    return _cpu_topology(name, count) if gen == "cpu" else _tpu_topology(name, gen, count)


# ----------------------------------------------------------------------------------------------
# Tracing a trainer's set-up to its programs
# ----------------------------------------------------------------------------------------------

def trainer_of(cfg) -> str:
    """The trainer whose config class ``cfg`` is (the first row of ``TRAINERS`` with exactly that class)."""
    for name, row in TRAINERS.items():
        if type(cfg) is load(row[0]):
            return name
    raise ConfigError(f"plan: no trainer takes a {type(cfg).__name__}; give --trainer "
                      f"({', '.join(TRAINERS)})")


def _placeholder_reward(cfg, work: Path):
    """An RL config whose ``reward.path`` does not exist yet (the reward model is trained first): plan it
    with a reward model of the policy's shape (a directory with only ``config.json``). Returns
    ``(cfg, note)``."""
    reward = getattr(cfg, "reward", None)
    if reward is None or reward.kind != "model" or not reward.path or Path(reward.path).is_dir():
        return cfg, None
    return dataclasses.replace(cfg, reward=dataclasses.replace(reward, path=str(work / "reward"))), (
        f"reward.path {reward.path!r} does not exist: the reward model is planned at the policy's shape")


def _abstract(x, mesh):
    """A leaf as a ShapeDtypeStruct placed as the run would (sharded leaves keep their sharding; anything
    unplaced, e.g. traced hyper-parameters, is replicated over the mesh)."""
    if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return x
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.ShapeDtypeStruct) else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or mesh_lib.replicated(mesh))


def trace_programs(cfg, trainer: str, *, sweep: dict | None = None) -> tuple[Any, list[loop.Program]]:
    """Runs trainer ``trainer``'s own set-up of ``cfg`` (abstract, traced) up to the loop; ``(mesh, its
    programs with abstract sharded inputs)``. Call it inside ``devices.targeting(..., abstract=True)``."""
    train_fn = load(TRAINERS[trainer][1])
    caught: list[loop.Planned] = []

    def setup():
        try:
            if sweep is None:
                train_fn(cfg)
            else:  # the vmapped sweep's one program (its runs over the mesh's runs axis)
                run_vmapped_sweep(cfg, sweep["grid"], seeds=sweep["seeds"], mesh=sweep["mesh"])
        except loop.Planned as p:
            caught.append(p)
        return None

    jax.eval_shape(setup)
    if not caught:
        raise ConfigError(f"plan: trainer {trainer!r} finished without reaching the training loop; "
                          "nothing to compile")
    progs, mesh = caught[0].programs, caught[0].mesh
    out = []
    for p in progs:
        args = jax.tree_util.tree_map(lambda x: _abstract(x, mesh), p.args)
        kwargs = jax.tree_util.tree_map(lambda x: _abstract(x, mesh), p.kwargs)
        out.append(dataclasses.replace(p, args=args, kwargs=kwargs))
    return mesh, out


def memory_bytes(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program from its own memory analysis; ``peak`` =
    arguments + outputs − aliased (donated buffers reused for outputs) + temporaries + generated code."""
    m = compiled.memory_analysis()
    if m is None:
        raise ConfigError("plan: the compiler gave no memory analysis for this program")
    arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    code = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "code_bytes": code, "per_device_bytes": arg + out - alias + temp + code}


def cost(compiled) -> dict[str, float]:
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    return {"flops": float(c.get("flops", 0.0) or 0.0), "bytes_accessed": float(c.get("bytes accessed", 0.0) or 0.0)}


def program_report(prog: loop.Program, topo: Topology) -> dict[str, Any]:
    """Compile one program for ``topo``; its memory, FLOPs, roofline time and MFU ceiling per device."""
    t0 = time.perf_counter()
    n = topo.num_devices
    model = None if prog.model_flops is None else prog.model_flops / n
    try:
        compiled = prog.fn.lower(*prog.args, **prog.kwargs).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _refused_report(prog, topo, model, str(e), time.perf_counter() - t0)
    secs = time.perf_counter() - t0
    mem, c = memory_bytes(compiled), cost(compiled)
    flops = max(c["flops"], model or 0.0)
    t_compute = flops / topo.peak_flops_per_device
    t_memory = c["bytes_accessed"] / topo.hbm_bandwidth_per_device
    roofline = max(t_compute, t_memory)
    hbm = topo.hbm_bytes_per_device
    return {
        "name": prog.name, **mem,
        "hbm_bytes_per_device": hbm, "fits": bool(mem["per_device_bytes"] <= hbm),
        "headroom": 1.0 - mem["per_device_bytes"] / hbm,
        "flops": flops, "compiler_flops": c["flops"], "model_flops_per_device": model,
        "bytes_accessed": c["bytes_accessed"],
        "roofline_seconds": roofline, "bound": "compute" if t_compute >= t_memory else "memory",
        "mfu_ceiling": None if model is None or roofline <= 0 else (model / topo.peak_flops_per_device) / roofline,
        "compile_seconds": secs,
    }


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _refused_report(prog: loop.Program, topo: Topology, model: float | None, message: str, secs: float) -> dict:
    """The report of a program the target's compiler refused for lack of memory (TPU: "Ran out of memory in
    memory space hbm ... temporaries (X G) exceeds available HBM (Y G)"): does not fit, by at least the
    temporaries it names."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    temp = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    hbm = topo.hbm_bytes_per_device
    roofline = None if model is None else model / topo.peak_flops_per_device
    first = message.strip().splitlines()[0][:300]
    return {"name": prog.name, "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
            "temp_bytes": temp, "code_bytes": None, "per_device_bytes": temp, "hbm_bytes_per_device": hbm,
            "fits": False, "headroom": 1.0 - temp / hbm if temp == temp else None,
            "flops": model, "compiler_flops": None, "model_flops_per_device": model, "bytes_accessed": None,
            "roofline_seconds": roofline, "bound": "compute" if roofline is not None else None,
            "mfu_ceiling": None, "compile_seconds": secs, "compiler_refused": first}


def advice(cfg, trainer: str, report: dict) -> list[str]:
    """What would make a program that does not fit (or fits with < 10% headroom) fit: the usual levers
    that this config has not pulled yet."""
    if report["fits"] and report["headroom"] >= 0.10:
        return []
    tips = []
    mesh = cfg.mesh
    if mesh.data != 1:
        tips.append("shard params and optimiser state over more devices: mesh.data=1 mesh.fsdp=-1")
    sections = [k for k in ("model", "policy") if hasattr(cfg, k)]
    for key in sections:
        sec = getattr(cfg, key)
        if not sec.remat:
            tips.append(f"rematerialise the layers: {key}.remat=true")
        elif sec.remat_policy != "full":
            tips.append(f"keep fewer activations: {key}.remat_policy=full")
        if sec.param_dtype == "float32" and not sec.uses_lora:
            tips.append(f"store the weights in bf16: {key}.param_dtype=bfloat16")
        if not sec.uses_lora:
            tips.append(f"train LoRA adapters on a frozen base: {key}.lora_rank=16")
        if not sec.logits_chunk and trainer in ("sft", "dpo"):
            tips.append(f"compute the loss's logits in chunks: {key}.logits_chunk=512")
        elif key == "policy" and not sec.logits_chunk and trainer != "reward":
            tips.append("compute the policy's log-probs in chunks: policy.logits_chunk=<divisor of max_new_tokens>")
    if getattr(cfg.optim, "state_dtype", "float32") == "float32":
        tips.append("keep Adam's moments in bf16: optim.state_dtype=bfloat16")
    if hasattr(cfg, "micro_batches"):
        tips.append(f"more micro-batches per step: micro_batches={2 * cfg.micro_batches}")
    algo = getattr(cfg, "section", "")
    if algo:
        tips.append(f"smaller minibatches: {algo}.minibatches={2 * getattr(cfg, algo).minibatches}")
    tips.append("a larger slice (more devices for fsdp)")
    return tips


def plan(cfg, topo: Topology, *, trainer: str | None = None, sweep: dict | None = None) -> dict[str, Any]:
    """Compile the programs of ``cfg``'s trainer for ``topo``; the report as a dict (see the module doc).

    ``sweep``: ``{"grid": {key: [value strings]}, "seeds": N, "mesh": MeshConfig | None}`` plans the
    vmapped sweep of those runs (``rlhf-jax sweep --vmap``) instead of one run."""
    trainer = trainer or trainer_of(cfg)
    if trainer not in TRAINERS:
        raise ConfigError(f"--trainer {trainer!r}: unknown; choose from {', '.join(TRAINERS)}")
    notes = []
    work = Path(tempfile.mkdtemp(prefix="rlhf_jax_plan_"))
    try:
        cfg, note = _placeholder_reward(cfg, work)
        if note:
            notes.append(note)
        with devices_lib.targeting(topo.devices, abstract=True, name=topo.name):
            if note:
                _reward_config_like_policy(cfg, work / "reward")
            mesh, progs = trace_programs(cfg, trainer, sweep=sweep)
            reports = [program_report(p, topo) for p in progs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in reports:
        r["advice"] = advice(cfg, trainer, r)
    return {
        "topology": topo.name, "platform": topo.platform, "device_kind": topo.device_kind,
        "num_devices": topo.num_devices, "num_processes": devices_lib.Target(topo.devices).num_processes,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "hbm_bytes_per_device": topo.hbm_bytes_per_device, "peak_flops_per_device": topo.peak_flops_per_device,
        "hbm_bandwidth_per_device": topo.hbm_bandwidth_per_device, "device_figures": topo.source,
        "trainer": trainer, "sweep": None if sweep is None else {
            "grid": sweep["grid"], "seeds": sweep["seeds"],
            "runs": sweep["seeds"] * int(np.prod([len(v) for v in sweep["grid"].values()] or [1]))},
        "programs": reports, "notes": notes,
        "fits": all(r["fits"] for r in reports),
    }


def _reward_config_like_policy(cfg, out: Path) -> None:
    """A reward-model directory holding only ``config.json``: the policy's model config (built the way the
    trainer builds it, abstractly) as a Hugging Face config."""
    task = get_task_or_none(cfg.task)
    tok = load_tokenizer(require_tokenizer_dir(cfg.data.tokenizer, cfg.policy.path, task, "policy"))
    box = {}

    def build():
        box["config"] = build_model(dataclasses.replace(cfg.policy, lora_rank=0, lora_path=""), task=task,
                                    tokenizer=tok, head=None, rng=jax.random.PRNGKey(0))[2]
    jax.eval_shape(lambda: (build(), None)[1])
    out.mkdir(parents=True, exist_ok=True)
    hf = box["config"].to_hf()
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def format_report(rep: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    lines = [f"plan: {rep['trainer']} on {rep['topology']}: {rep['num_devices']} x {rep['device_kind']} "
             f"({rep['num_processes']} host(s)), mesh {mesh}",
             f"  per device: {_gib(rep['hbm_bytes_per_device'])} GiB HBM, "
             f"{_rate(rep['peak_flops_per_device'])}, {rep['hbm_bandwidth_per_device'] / 1e9:.1f} GB/s "
             f"({rep['device_figures']})"]
    head = ("program", "peak GiB", "args", "out", "temp", "HBM GiB", "fits", "headroom", "TFLOP/dev",
            "model TFLOP/dev", "roofline s", "bound", "MFU ceiling", "compile s")
    rows = []
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    for r in rep["programs"]:
        gib = lambda x: "-" if x is None else _gib(x)  # noqa: E731
        rows.append((r["name"], (">= " if r.get("compiler_refused") else "") + gib(r["per_device_bytes"]),
                     gib(r["argument_bytes"]), gib(r["output_bytes"]), gib(r["temp_bytes"]),
                     gib(r["hbm_bytes_per_device"]), "yes" if r["fits"] else "NO",
                     "-" if r["headroom"] is None else f"{100 * r['headroom']:.0f}%",
                     num(None if r["flops"] is None else r["flops"] / 1e12, ".3g"),
                     num(None if r["model_flops_per_device"] is None else r["model_flops_per_device"] / 1e12, ".3g"),
                     num(r["roofline_seconds"], ".3g"), r["bound"] or "-", num(r["mfu_ceiling"], ".2f"),
                     f"{r['compile_seconds']:.0f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*head))
    lines += [fmt.format(*row) for row in rows]
    for r in rep["programs"]:
        if r.get("compiler_refused"):
            lines.append(f"  {r['name']}: the compiler refused it: {r['compiler_refused']}")
        if r["advice"]:
            lines.append(f"  {r['name']}: {'does not fit' if not r['fits'] else 'under 10% headroom'}; "
                         "what would help: " + "; ".join(r["advice"]))
    lines += [f"  note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiments/*.py file with get_config()")
    parser.add_argument("--topology", required=True,
                        help="TPU slice (v4-32, v5e-16, v5p-64, v6e-256: TensorCores for v4/v5p, chips for "
                             "v5e/v6e) or cpu:N (N fake CPU devices)")
    parser.add_argument("--trainer", default=None, choices=sorted(TRAINERS),
                        help="the trainer (default: the one whose config class get_config() returns)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--vmap-grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="plan the vmapped sweep over these traced keys (as rlhf-jax sweep --vmap --grid)")
    parser.add_argument("--seeds", type=int, default=1, help="with --vmap-grid: seeds per point")
    parser.add_argument("--mesh", default=None, metavar="runs=R,data=D,fsdp=F",
                        help="with --vmap-grid: the sweep's device mesh (default: the config's mesh section)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _set_cpu_devices(count: int) -> None:
    """Ask for ``count`` fake CPU devices when JAX's backends have not started yet (else the check in
    :func:`_cpu_topology` explains)."""
    try:
        jax.config.update("jax_num_cpu_devices", max(count, 1))
    except RuntimeError:  # backends already initialised in this process: keep what is there
        return


def run(args) -> int:
    gen, count = parse_topology_name(args.topology)
    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json!r}: is a directory; give a file path")
    cfg = load_config_file(args.config)
    cfg = apply_overrides(cfg, list(args.overrides or []))
    if gen == "cpu":
        _set_cpu_devices(count)
    sweep = None
    if args.vmap_grid:
        grid = parse_grid(args.vmap_grid)
        mesh = parse_mesh(args.mesh) if args.mesh else None
        sweep = {"grid": grid, "seeds": int(args.seeds), "mesh": mesh}
    elif args.mesh or args.seeds != 1:
        raise ConfigError("--mesh/--seeds plan a vmapped sweep: give --vmap-grid KEY=V1,V2 too (a single run's "
                          "mesh is the config's mesh section: mesh.data=/mesh.fsdp= overrides)")
    topo = topology(args.topology)
    rep = plan(cfg, topo, trainer=args.trainer, sweep=sweep)
    rep["config"] = args.config
    rep["overrides"] = list(args.overrides or [])
    rep["resolved_config"] = to_dict(cfg)
    print(format_report(rep), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str) + "\n")
        print(f"plan: wrote {args.json}", file=sys.stderr)
    return 0
