"""``rlhf-jax sweep``: the points of a grid/random search over an experiment config, run here one
after another, emitted as launch commands (``--emit-commands``) or run as one vmapped program
(``--vmap``); see :mod:`rlhf_jax.sweeps`.

    rlhf-jax sweep experiments/sft_sort_tiny.py --grid optim.learning_rate=1e-3,3e-3 --seeds 2 --out runs/sw
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.05,0.2 --seeds 4 --out runs/kl
    rlhf-jax sweep experiments/ppo_sort_tiny.py --vmap --grid ppo.kl_coef=0.01,0.2 --seeds 4 --mesh runs=4,fsdp=2
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.sweeps.points import SweepPoint, expand_points, launch_command, parse_grid, parse_random
from rlhf_jax.sweeps.sequential import TRAINERS, run_sequential
from rlhf_jax.sweeps.vmapped import run_vmapped_sweep, vmap_values
from rlhf_jax.training.common import init_distributed_from_args
from rlhf_jax.training.configs import MeshConfig
from rlhf_jax.training.distributed import add_distributed_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config file (a Python file with get_config())")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="grid over a config key (repeatable)")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST:A:B",
                        help="random search: uniform:LO:HI, loguniform:LO:HI, int:LO:HI, choice:A:B")
    parser.add_argument("--num-samples", type=int, default=0, help="random samples per grid point")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per point (0..N-1)")
    parser.add_argument("--seed-key", default="seed", help="config key holding the seed")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory")
    parser.add_argument("--emit-commands", metavar="FILE",
                        help="write one launch command per point to FILE ('-' for stdout) instead of running")
    parser.add_argument("--launch-suffix", default="",
                        help="appended to each emitted command (e.g. multi-host flags)")
    parser.add_argument("--emit-format", choices=("lines", "slurm", "tpu-vm"), default="lines",
                        help="--emit-commands as: one command per line; a SLURM sbatch array script (one array "
                             "task per point, srun + --distributed-auto); or one gcloud command per point that "
                             "runs it on every worker of a TPU VM slice (--tpu, --zone)")
    parser.add_argument("--tpu", default="", help="--emit-format tpu-vm: the TPU VM slice's name")
    parser.add_argument("--zone", default="", help="--emit-format tpu-vm: its zone")
    parser.add_argument("--workdir", default="",
                        help="--emit-format tpu-vm/slurm: directory the commands run in (default: this one); "
                             "--out and the config path are relative to it")
    parser.add_argument("--vmap", action="store_true",
                        help="PPO/GRPO/RLOO: run seeds x values of traced hyper-parameters as ONE vmapped program")
    parser.add_argument("--save-policies", action="store_true",
                        help="--vmap: write each run's final policy as a Hugging Face directory <out>/<point>/export")
    parser.add_argument("--mesh", metavar="runs=R,data=D,fsdp=F", default=None,
                        help="--vmap: device mesh of the one program: the runs (seeds x grid points) are split over "
                             "'runs', each run's params over 'fsdp' and its batch over 'data' x 'fsdp'; "
                             "runs x data x fsdp = devices (data or fsdp -1 = the rest) and the number of runs "
                             "a multiple of runs, e.g. --mesh runs=8 or --mesh runs=4,fsdp=2 on 8 devices "
                             "(default: the config's mesh.* keys when set, else one device)")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="sequential sweeps: stop at the first failing point instead of going on")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides applied to every point")
    add_distributed_arguments(parser)  # a --vmap sweep (or a sequential one) on every host of a slice
    # `sweep CONFIG --grid a=1,2 steps=2`: the overrides may come after the options, which plain
    # parse_args cannot split from the CONFIG positional; intermixed parsing can.
    parser.parse_args = parser.parse_intermixed_args



def run(args: argparse.Namespace) -> int:
    base = apply_overrides(load_config_file(args.config), args.overrides)
    grid = parse_grid(args.grid)
    random_specs = parse_random(args.random)
    out_dir = Path(args.out)
    if not args.emit_commands:  # runs here: join the other hosts first (no-op without multi-host flags)
        init_distributed_from_args(args)
    if args.vmap:
        return _run_vmapped(args, base, grid, bool(random_specs), out_dir)
    if args.mesh is not None:
        raise ConfigError("--mesh lays out the one program of a --vmap sweep; the points of a sequential sweep "
                          "take mesh.data=/mesh.fsdp= overrides")
    points = expand_points(grid, random_specs=random_specs, num_samples=args.num_samples,
                           seeds=args.seeds, seed_key=args.seed_key, sweep_seed=args.sweep_seed)
    for p in points:  # validate all points before anything runs or is emitted
        apply_overrides(base, p.overrides)
    if args.emit_commands:
        return _emit_commands(args, base, points, out_dir)
    rows = run_sequential(args.config, base, points, out_dir, stop_on_error=args.stop_on_error)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows)} points -> {out_dir / 'results.csv'}"
          + (f"; {len(failed)} FAILED: " + "; ".join(f"point {r['point']}: {r['error']}" for r in failed)
             if failed else ""))
    return 1 if failed else 0


def _cd(workdir: str) -> str:
    """``cd DIR`` for a shell, keeping a leading ``~/`` expandable."""
    if workdir.startswith("~/"):
        return f"cd ~/{shlex.quote(workdir[2:])}"
    return f"cd {shlex.quote(workdir)}"


def slurm_array_script(commands: list[str], out_dir: Path, workdir: str) -> str:
    """An ``sbatch`` script: array task ``i`` runs point ``i``'s command under ``srun`` (one process per
    task; ``--distributed-auto`` lets JAX read SLURM's layout). Give nodes/tasks/GPUs on the sbatch line."""
    body = "\n".join(f"  {shlex.quote(c)}" for c in commands)
    return (f"#!/bin/bash\n"
            f"# rlhf-jax sweep: {len(commands)} points, one SLURM array task each. Submit with e.g.\n"
            f"#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 THIS_FILE\n"
            f"#SBATCH --job-name=rlhf_jax_sweep\n"
            f"#SBATCH --array=0-{len(commands) - 1}\n"
            f"#SBATCH --output={out_dir}/slurm-%A_%a.log\n"
            f"set -euo pipefail\n"
            f"{_cd(workdir)}\n"
            f"COMMANDS=(\n{body}\n)\n"
            f"srun bash -c \"${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}\"\n")


def tpu_vm_script(commands: list[str], tpu: str, zone: str, workdir: str) -> str:
    """A shell script running the points one after another on every worker of a TPU VM slice (``gcloud
    ... ssh --worker=all``: one process per host, ``--distributed-auto`` finds the slice's layout)."""
    out = [f"#!/bin/bash\n# rlhf-jax sweep: {len(commands)} points on TPU VM slice {tpu} ({zone}), one after "
           "another, each on all workers\nset -euo pipefail"]
    for c in commands:
        remote = f"{_cd(workdir)} && {c}"
        out.append(f"gcloud compute tpus tpu-vm ssh {shlex.quote(tpu)} --zone={shlex.quote(zone)} --worker=all "
                   f"--command={shlex.quote(remote)}")
    return "\n".join(out) + "\n"


def parse_mesh(spec: str) -> MeshConfig:
    """``--mesh runs=4,fsdp=2`` -> ``MeshConfig(runs=4, fsdp=2)`` (unset axes keep their defaults:
    runs=1, data=-1, fsdp=1); a ConfigError names the flag."""
    kw: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in ("runs", "data", "fsdp"):
            raise ConfigError(f"--mesh {spec!r}: expected comma-separated runs=R,data=D,fsdp=F, got {part!r}")
        if name in kw:
            raise ConfigError(f"--mesh {spec!r}: {name} given twice")
        try:
            kw[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: {name}={value!r} is not an integer") from None
    if not kw:
        raise ConfigError(f"--mesh {spec!r}: expected runs=R,data=D,fsdp=F")
    return MeshConfig(**kw)


def _run_vmapped(args: argparse.Namespace, base, grid: dict[str, list[str]], has_random: bool,
                 out_dir: Path) -> int:
    if has_random:
        raise ConfigError("--vmap takes --grid values only (no --random)")
    if args.emit_commands:
        raise ConfigError("--vmap runs one program here; it cannot be combined with --emit-commands")
    vmap_values(base, grid)  # refuse non-traced keys before anything is built
    mesh = parse_mesh(args.mesh) if args.mesh else None
    res = run_vmapped_sweep(base, grid, seeds=args.seeds, out_dir=out_dir, config_path=args.config,
                            save_policies=args.save_policies, mesh=mesh)
    print(f"{res.num_runs} vmapped runs in one program (compile {res.compile_seconds:.1f} s, "
          f"run {res.run_seconds:.1f} s) -> {out_dir / 'results.csv'}")
    return 0


def _emit_commands(args: argparse.Namespace, base, points: list[SweepPoint], out_dir: Path) -> int:
    command, _ = TRAINERS.get(type(base).__name__, (None, None))
    if command is None:
        raise ConfigError(f"no rlhf-jax subcommand runs a {type(base).__name__}")
    fmt = getattr(args, "emit_format", "lines")
    suffix = args.launch_suffix
    if fmt != "lines" and "--distributed-auto" not in suffix:  # each point is one multi-host job
        suffix = f"{suffix} --distributed-auto".strip()
    lines = [launch_command(args.config, command, p, str(out_dir), suffix) for p in points]
    workdir = getattr(args, "workdir", "") or os.getcwd()
    if fmt == "slurm":
        text = slurm_array_script(lines, out_dir, workdir)
    elif fmt == "tpu-vm":
        if not args.tpu or not args.zone:
            raise ConfigError("--emit-format tpu-vm: give the slice's --tpu NAME and --zone ZONE")
        text = tpu_vm_script(lines, args.tpu, args.zone, workdir)
    else:
        text = "\n".join(lines) + "\n"
    if args.emit_commands == "-":
        print(text, end="")
    else:
        Path(args.emit_commands).write_text(text)
        print(f"{len(lines)} commands -> {args.emit_commands}")
    return 0
