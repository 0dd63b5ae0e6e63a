"""``rlhf-jax compare``: the algorithm family side by side on an embedded gold-reward task.

    rlhf-jax compare --task sort --algos ppo,grpo,rloo,dapo,gspo,reinforce_pp,online_dpo,dpo,kto,simpo \\
        --seeds 3 --out runs/compare_sort [--budget tiny|small|full] [--from DIR]

Every algorithm starts from the same SFT policy; the online ones optimise the same learned reward model,
the offline ones train on the same simulated preference pairs that reward model was trained on. Both
come from one SFT + reward-model run (made here, or an earlier ``rlhf-jax pipeline``/``compare`` run
given with ``--from``). The budget is matched and stated in the leaderboard:

* online (PPO, GRPO, RLOO, DAPO, GSPO, REINFORCE++, online DPO, RSFT): the same number of policy samples per
  iteration (``rollout``) and the same number of iterations, each with its usual update schedule
  (PPO: 4 epochs × 2 minibatches, as the pipeline; the others: 1 epoch × 2 minibatches), one shared
  learning rate, the seeds of one algorithm vmapped into one program (``sweeps.run_vmapped_sweep``);
  DAPO's dynamic sampling may draw up to 2× the samples, the ``samples`` column counts what it drew;
  RSFT (best of 4 samples per prompt, one SFT step on the kept ones) runs one trainer per seed;
  With ``--reward gold`` they optimise the task's gold (verifiable) reward instead (for ``arith``, where a
  small learned reward model cannot check sums);
* offline (DPO, KTO, SimPO): ``2 × iterations`` gradient steps (the critic-free algorithms' update
  count) on ``offline_batch`` pairs, one run per seed.

Each final policy is evaluated on the task's held-out test prompts (one sample each, temperature 1):
gold reward, proxy (reward-model) reward and KL to the SFT policy; ``leaderboard.json``/``.md`` give per
algorithm the mean ± standard error over seeds of the gold gain over SFT, the proxy reward, the KL,
gold gain per nat of KL, wall time and compile time. No algorithm's hyper-parameters are tuned here:
each recipe below is its paper's/TRL's default shape at the shared learning rate.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataConfig
from rlhf_jax.evaluation import evaluate_policy
from rlhf_jax.pipeline import PipelineConfig, stage_configs
from rlhf_jax.rl import (RL_OPTIM, DPOConfig, DPOHParams, DPOTrainConfig, GRPOConfig, GRPOHParams, GRPOTrainConfig,
                         OnlineDPOConfig, OnlineDPOHParams, OnlineDPOTrainConfig, RewardSection, RLOOTrainConfig,
                         build_setup, train_dpo)
from rlhf_jax.rl.experience import lm_view
from rlhf_jax.rl.rsft import RSFTConfig, RSFTTrainConfig, train_rsft
from rlhf_jax.sweeps.vmapped import run_policy_params, run_vmapped_sweep
from rlhf_jax.tasks import get_task, list_tasks
from rlhf_jax.training import train_reward, train_sft
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig

LR = 3e-4  # the one learning rate every algorithm gets (the pipeline PPO's)
GROUP = 4  # samples per prompt of the group-based algorithms


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much each algorithm gets. sft_steps/rm_steps: the shared SFT and reward-model runs (when not
    given with --from). rollout: policy samples per online iteration. iterations: online iterations
    (offline: 2 × iterations steps). offline_batch: pairs per offline step. eval_prompts: held-out prompts."""
    sft_steps: int
    rm_steps: int
    rollout: int
    iterations: int
    offline_batch: int
    eval_prompts: int


BUDGETS = {
    "tiny": Budget(sft_steps=30, rm_steps=30, rollout=16, iterations=2, offline_batch=8, eval_prompts=32),
    "small": Budget(sft_steps=200, rm_steps=200, rollout=64, iterations=15, offline_batch=32, eval_prompts=128),
    "full": Budget(sft_steps=200, rm_steps=200, rollout=64, iterations=40, offline_batch=32, eval_prompts=256),
}

ONLINE = ("ppo", "grpo", "rloo", "dapo", "gspo", "reinforce_pp", "online_dpo", "rsft")
SEQUENTIAL = ("rsft",)  # online, but not a make_train algorithm: one trainer run per seed
OFFLINE = {"dpo": "sigmoid", "kto": "kto", "simpo": "simpo"}
ALGOS = ONLINE + tuple(OFFLINE)


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """One comparison: task, algorithms, seeds per algorithm, output directory, budget name, and
    optionally a directory with the SFT policy and reward model to start from."""
    task: str
    algos: tuple[str, ...]
    seeds: int
    out_dir: str
    budget: str = "small"
    from_dir: str = ""
    reward: str = "model"

    def validate(self) -> "CompareSpec":
        if self.task not in list_tasks():
            raise ConfigError(f"--task: unknown task {self.task!r}; choose from {list_tasks()}")
        if not self.algos:
            raise ConfigError(f"--algos: give at least one of {','.join(ALGOS)}")
        unknown = [a for a in self.algos if a not in ALGOS]
        if unknown:
            raise ConfigError(f"--algos: unknown algorithm(s) {unknown}; choose from {','.join(ALGOS)}")
        if len(set(self.algos)) != len(self.algos):
            raise ConfigError(f"--algos: {list(self.algos)} names an algorithm twice")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds: expected an integer >= 1, got {self.seeds!r}")
        if self.reward not in ("model", "gold"):
            raise ConfigError(f"--reward: expected model|gold, got {self.reward!r}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"--budget: expected one of {'|'.join(BUDGETS)}, got {self.budget!r}")
        out = Path(self.out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {self.out_dir!r} exists and is not an empty directory; choose a new one")
        if self.from_dir:
            base_exports(self.from_dir, self.task)
        return self


def base_exports(from_dir: str, task: str) -> tuple[str, str]:
    """``(sft_export, reward_export)`` recorded in an earlier run directory: a pipeline's ``summary.json``
    or a comparison's ``base.json``; a ConfigError names the file and the missing field."""
    d = Path(from_dir)
    for name, sft_key, rm_key in (("base.json", ("sft_export",), ("reward_export",)),
                                  ("summary.json", ("sft", "export_dir"), ("reward_model", "export_dir"))):
        path = d / name
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--from: {path}: not JSON ({e})") from None

        def get(keys):
            x = rec
            for k in keys:
                if not isinstance(x, dict) or k not in x:
                    raise ConfigError(f"--from: {path}: no field {'.'.join(keys)!r}")
                x = x[k]
            return str(x)

        if rec.get("task", task) != task:
            raise ConfigError(f"--from: {path} is a run of task {rec.get('task')!r}, not {task!r}")
        sft, rm = get(sft_key), get(rm_key)
        for p, what in ((sft, "SFT export"), (rm, "reward-model export")):
            if not (Path(p) / "config.json").is_file():
                raise ConfigError(f"--from: {path}: the {what} {p!r} has no config.json")
        return sft, rm
    raise ConfigError(f"--from {from_dir!r}: no base.json (rlhf-jax compare) or summary.json (rlhf-jax pipeline) there")


# --------------------------------------------------------------------------------------------- recipes

def _rl_common(task: str, sft: str, rm: str, budget: Budget, out: Path, reward: str) -> dict[str, Any]:
    section = RewardSection(kind="model", path=rm) if reward == "model" else RewardSection(kind="gold")
    return dict(task=task, policy=ModelSection(name="task", path=sft), reward=section,
                data=DataConfig(batch_size=8, max_length=64), optim=RL_OPTIM, iterations=budget.iterations,
                sample_every=0, checkpoint=CheckpointConfig(every=0, keep=1), log=LogConfig(every=1, progress=False),
                out_dir=str(out))


def online_config(algo: str, task: str, sft: str, rm: str, budget: Budget, out: Path, reward: str = "model"):
    """The trainer config of an online algorithm at the comparison's budget (see the module docstring);
    ``reward="gold"`` optimises the task's gold (verifiable) reward instead of the reward model."""
    n_tok = get_task(task).response_length
    common = _rl_common(task, sft, rm, budget, out, reward)
    if algo == "ppo":  # the pipeline's PPO stage (adaptive β, value model from the reward model)
        _, _, ppo = stage_configs(PipelineConfig(task=task), sft_export=sft, reward_export=rm)
        section = dataclasses.replace(ppo.ppo, batch_size=budget.rollout, max_new_tokens=n_tok)
        section = section.replace(hparams=section.hparams.replace(lr=LR))
        return dataclasses.replace(ppo, **{k: v for k, v in common.items() if k not in ("reward", "policy")},
                                   policy=dataclasses.replace(ppo.policy, path=sft), ppo=section,
                                   reward=common["reward"] if reward == "gold" else ppo.reward,
                                   value_init="reward" if reward == "model" else "policy")
    if algo == "rsft":  # best of GROUP samples per prompt, one SFT step on the kept ones per iteration
        common = dict(common, optim=dataclasses.replace(RL_OPTIM, learning_rate=LR))
        return RSFTTrainConfig(**common, rsft=RSFTConfig(batch_size=budget.rollout // GROUP, num_samples=GROUP,
                                                         max_new_tokens=n_tok))
    if algo == "online_dpo":
        return OnlineDPOTrainConfig(**common, online_dpo=OnlineDPOConfig(
            batch_size=budget.rollout // 2, max_new_tokens=n_tok, minibatches=2,
            hparams=OnlineDPOHParams(beta=0.1, lr=LR)))
    grpo = dict(batch_size=budget.rollout // GROUP, group_size=GROUP, max_new_tokens=n_tok, minibatches=2)
    if algo == "grpo":
        return GRPOTrainConfig(**common, grpo=GRPOConfig(**grpo, hparams=GRPOHParams(kl_coef=0.04, lr=LR)))
    if algo == "rloo":
        return RLOOTrainConfig(**common, rloo=GRPOConfig(**grpo, advantage="rloo", use_kl_loss=False,
                                                        loss_aggregation="token-mean",
                                                        hparams=GRPOHParams(kl_coef=0.05, lr=LR)))
    if algo == "dapo":
        return GRPOTrainConfig(**common, grpo=GRPOConfig(
            **grpo, loss_aggregation="token-mean", use_kl_loss=False, overlong_buffer=max(1, n_tok // 4),
            mask_zero_std_groups=True, dynamic_sampling_rounds=2,
            hparams=GRPOHParams(kl_coef=0.0, lr=LR, clip_eps=0.2, clip_eps_high=0.28)))
    if algo == "gspo":
        return GRPOTrainConfig(**common, grpo=GRPOConfig(
            **grpo, policy_loss="gspo", use_kl_loss=False,
            hparams=GRPOHParams(kl_coef=0.0, lr=LR, clip_eps=3e-4, clip_eps_high=4e-4)))
    if algo == "reinforce_pp":
        return GRPOTrainConfig(**common, grpo=GRPOConfig(
            **grpo, advantage="reinforce_pp", use_kl_loss=False, loss_aggregation="token-mean",
            hparams=GRPOHParams(kl_coef=0.05, lr=LR)))
    raise ConfigError(f"--algos: {algo!r} is not an online algorithm")


def offline_config(algo: str, task: str, sft: str, budget: Budget, seed: int, out: Path) -> DPOTrainConfig:
    """The DPO-trainer config of an offline algorithm: the task's simulated pairs, ``2 × iterations`` steps."""
    return DPOTrainConfig(
        task=task, seed=seed, policy=ModelSection(name="task", path=sft),
        data=DataConfig(batch_size=budget.offline_batch, max_length=64), steps=2 * budget.iterations,
        eval_every=0, export=False, dpo=DPOConfig(loss_type=OFFLINE[algo], hparams=DPOHParams(lr=LR)),
        checkpoint=CheckpointConfig(every=0, keep=1), log=LogConfig(every=1, progress=False), out_dir=str(out))


# --------------------------------------------------------------------------------------------- running

class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its monitoring events) while it is active."""

    EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/jaxpr_trace_duration")
    _registered = False
    _totals: collections.Counter = collections.Counter()

    @classmethod
    def total(cls) -> float:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True
        return float(sum(cls._totals[e] for e in cls.EVENTS))

    @classmethod
    def _listen(cls, name: str, secs: float, **_: Any) -> None:
        cls._totals[name] += secs


def _mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), se


def _row(algo: str, kind: str, evals: list[dict], sft_gold: float, wall: float, compile_s: float,
         budget_text: str, samples: float | None) -> dict[str, Any]:
    gold = [e["gold_reward"] for e in evals]
    gain = [g - sft_gold for g in gold]
    kl = [e["kl"] for e in evals]
    proxy = [e["proxy_reward"] for e in evals]
    row = {"algorithm": algo, "kind": kind, "seeds": len(evals), "budget": budget_text}
    for name, xs in (("gold", gold), ("gold_gain", gain), ("proxy", proxy), ("kl", kl)):
        row[name], row[name + "_se"] = _mean_se(xs)
    row["gain_per_nat"] = row["gold_gain"] / row["kl"] if row["kl"] > 1e-3 else None
    row.update(wall_seconds=wall, compile_seconds=compile_s, samples=samples,
               per_seed=[{"gold": g, "kl": k, "proxy": p} for g, k, p in zip(gold, kl, proxy)])
    return row


def run_compare(spec: CompareSpec, *, command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the comparison ``spec`` (validated first: nothing is written for a bad one); writes
    ``leaderboard.json``/``.md`` (and each algorithm's runs) under ``spec.out_dir``; returns the leaderboard."""
    spec.validate()
    budget = BUDGETS[spec.budget]
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if spec.from_dir:
        sft, rm = base_exports(spec.from_dir, spec.task)
        log(f"base: SFT {sft}, reward model {rm} (from {spec.from_dir})")
    else:
        pcfg = PipelineConfig(task=spec.task, seed=0, out_dir=str(out / "base"))
        sft_cfg, _, _ = stage_configs(pcfg)
        log(f"base: SFT {budget.sft_steps} steps on {spec.task!r}")
        sft = train_sft(dataclasses.replace(sft_cfg, steps=budget.sft_steps, eval_every=0)).export_dir
        _, rm_cfg, _ = stage_configs(pcfg, sft_export=sft)
        log(f"base: reward model {budget.rm_steps} steps")
        rm = train_reward(dataclasses.replace(rm_cfg, steps=budget.rm_steps, eval_every=0)).export_dir
    (out / "base.json").write_text(json.dumps({"task": spec.task, "sft_export": str(sft), "reward_export": str(rm)},
                                              indent=2) + "\n")

    # the SFT policy and reward model every evaluation uses (same prompts and key for every policy)
    probe = online_config("grpo", spec.task, sft, rm, budget, out / "_probe")
    base = build_setup(probe, num_prompts=1)
    task = get_task(spec.task)
    prompts = [r["prompt"] for r in task.prompt_records("test", num=budget.eval_prompts)]
    frozen = base.frozen

    def evaluate(params, model=None) -> dict:
        model, params = lm_view(base.policy_model if model is None else model, params)
        ev = evaluate_policy(task, model, params, frozen.ref_params, frozen.reward_model,
                             frozen.reward_params, prompts=prompts, seed=0, temperature=1.0,
                             reward_shift=float(frozen.reward_shift))
        ev.pop("samples", None)
        return ev

    sft_eval = evaluate(frozen.ref_params)
    log(f"SFT policy: gold {sft_eval['gold_reward']:.3f}, proxy {sft_eval['proxy_reward']:.3f}")
    rows = []
    for algo in spec.algos:
        t, c = time.perf_counter(), CompileClock.total()
        if algo in SEQUENTIAL:
            evals, wall, comp = [], 0.0, 0.0
            for s in range(spec.seeds):
                log(f"{algo}: seed {s}, {budget.iterations} iterations x {budget.rollout} samples")
                cfg = dataclasses.replace(online_config(algo, spec.task, sft, rm, budget, out / algo / f"seed{s}",
                                                        spec.reward), seed=s)
                ts, cs = time.perf_counter(), CompileClock.total()
                res = train_rsft(cfg)
                wall, comp = wall + time.perf_counter() - ts, comp + CompileClock.total() - cs
                evals.append(evaluate(res.state.policy.params))
            text = f"{budget.iterations} it x {budget.rollout} samples"
            rows.append(_row(algo, "online", evals, sft_eval["gold_reward"], wall, comp, text,
                             float(budget.iterations * budget.rollout)))
        elif algo in ONLINE:
            cfg = online_config(algo, spec.task, sft, rm, budget, out / algo, spec.reward)
            section = cfg.section
            log(f"{algo}: {spec.seeds} seeds x {budget.iterations} iterations x {budget.rollout} samples (vmapped)")
            res = run_vmapped_sweep(cfg, {f"{section}.lr": [str(LR)]}, seeds=spec.seeds, out_dir=out / algo)
            wall, compile_s = time.perf_counter() - t, CompileClock.total() - c
            evals = [evaluate(run_policy_params(res, i), res.setup.policy_model)
                     for i in range(res.num_runs)]
            rounds = float(np.mean(res.history["dynamic_sampling_rounds"])) if "dynamic_sampling_rounds" in \
                res.history else 1.0
            samples = budget.iterations * budget.rollout * rounds
            text = f"{budget.iterations} it x {budget.rollout} samples"
            rows.append(_row(algo, "online", evals, sft_eval["gold_reward"], wall, compile_s, text, samples))
        else:
            evals, wall, compile_s = [], 0.0, 0.0
            for s in range(spec.seeds):
                log(f"{algo}: seed {s}, {2 * budget.iterations} steps x {budget.offline_batch} pairs")
                ts, cs = time.perf_counter(), CompileClock.total()
                res = train_dpo(offline_config(algo, spec.task, sft, budget, s, out / algo / f"seed{s}"))
                wall, compile_s = wall + time.perf_counter() - ts, compile_s + CompileClock.total() - cs
                evals.append(evaluate(res.state.params))
            text = f"{2 * budget.iterations} steps x {budget.offline_batch} pairs"
            rows.append(_row(algo, "offline", evals, sft_eval["gold_reward"], wall, compile_s, text, None))
        r = rows[-1]
        log(f"{algo}: gold gain {r['gold_gain']:+.3f} ± {r['gold_gain_se']:.3f}, KL {r['kl']:.2f}, "
            f"{r['wall_seconds']:.0f} s (compile {r['compile_seconds']:.0f} s)")
    board = {
        "task": spec.task, "seeds": spec.seeds, "budget": spec.budget, "budget_detail": dataclasses.asdict(budget),
        "learning_rate": LR, "reward": spec.reward, "date": datetime.date.today().isoformat(),
        "command": command or default_command(spec), "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "sft": {k: sft_eval[k] for k in ("gold_reward", "proxy_reward", "kl")}, "sft_export": str(sft),
        "reward_export": str(rm), "rows": rows, "wall_seconds": time.perf_counter() - t0,
    }
    (out / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    (out / "leaderboard.md").write_text(leaderboard_markdown(board))
    log(f"done in {board['wall_seconds']:.0f} s: {out / 'leaderboard.md'}")
    return board


def default_command(spec: CompareSpec) -> str:
    args = ["rlhf-jax", "compare", "--task", spec.task, "--algos", ",".join(spec.algos), "--seeds", str(spec.seeds),
            "--budget", spec.budget, "--reward", spec.reward, "--out", spec.out_dir] + (
                ["--from", spec.from_dir] if spec.from_dir else [])
    return shlex.join(args)


def _fmt(x: float | None, se: float | None = None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f} ± {se:.{digits}f}" if se is not None else f"{x:.{digits}f}"


def leaderboard_markdown(board: dict) -> str:
    """The leaderboard as a Markdown table, best gold gain first."""
    b = board["budget_detail"]
    lines = [f"# Leaderboard: task `{board['task']}`", "",
             f"`{board['command']}` ({board['date']}, {board['device']}, {board['wall_seconds']:.0f} s)", "",
             f"Start: SFT policy gold {board['sft']['gold_reward']:.3f}, proxy {board['sft']['proxy_reward']:.3f}. "
             f"Matched budget: online algorithms {b['iterations']} iterations x {b['rollout']} policy samples "
             f"(DAPO's dynamic sampling may draw more: `samples`); offline {2 * b['iterations']} steps x "
             f"{b['offline_batch']} pairs; one learning rate ({board['learning_rate']:g}) for all; "
             f"{board['seeds']} seed(s) each (mean ± s.e.); evaluation on {b['eval_prompts']} held-out prompts. "
             f"Online reward: {'the learned reward model' if board['reward'] == 'model' else 'the gold (verifiable) reward'}"
             "; offline: the reward model's preference pairs.", "",
             "| algorithm | kind | gold gain over SFT | gold | proxy | KL to SFT | gain / nat | samples | wall s "
             "| compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(board["rows"], key=lambda r: -r["gold_gain"]):
        lines.append(f"| {r['algorithm']} | {r['kind']} | {_fmt(r['gold_gain'], r['gold_gain_se'])} | "
                     f"{r['gold']:.3f} | {r['proxy']:.3f} | {r['kl']:.2f} | {_fmt(r['gain_per_nat'])} | "
                     f"{'—' if r['samples'] is None else format(r['samples'], '.0f')} | {r['wall_seconds']:.0f} | "
                     f"{r['compile_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="sentiment", help=f"embedded task: {'|'.join(list_tasks())}")
    parser.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated, from {','.join(ALGOS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per algorithm (online: vmapped in one program)")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--budget", default="small", help=f"{'|'.join(BUDGETS)} (see rlhf_jax.compare.BUDGETS)")
    parser.add_argument("--reward", default="model",
                        help="what the online algorithms optimise: model (the learned reward model) or gold (the "
                             "task's verifiable reward; proxy is still the reward model's score)")
    parser.add_argument("--from", dest="from_dir", default="",
                        help="start from the SFT policy and reward model of an earlier pipeline or compare run")


def run(args) -> int:
    spec = CompareSpec(task=args.task, algos=tuple(a.strip() for a in args.algos.split(",") if a.strip()),
                       seeds=args.seeds, out_dir=args.out, budget=args.budget, from_dir=args.from_dir,
                       reward=args.reward)
    command = shlex.join(["rlhf-jax"] + sys.argv[1:]) if len(sys.argv) > 1 and sys.argv[1] == "compare" else ""
    run_compare(spec, command=command)
    return 0
