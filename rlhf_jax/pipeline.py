"""The main job: SFT → reward model → PPO on an embedded gold-reward task, evaluated against gold.

    rlhf-jax pipeline [--task NAME] [--seed N] [--out DIR] [--config FILE] [KEY=VALUE ...]
    make demo                                   # = rlhf-jax pipeline --out runs/demo

Stages (each one the library's own trainer, run from Python; nothing is re-implemented here):

1. ``training.train_sft``: the task's tiny model from scratch (or ``init_from`` = a Hugging Face
   directory) on the noisy demonstrations → the SFT policy, also the frozen PPO reference.
2. ``training.train_reward``: a Bradley–Terry reward model (initialised from the SFT trunk, fresh
   scalar head) on pairs labelled by the simulated labeller (BT sampling on gold, temperature
   ``label_noise``) → the proxy reward.
3. ``rl.train_ppo``: PPO against the LEARNED reward model with the KL penalty to the SFT policy.
4. Evaluation on held-out (``test``) prompts of the SFT and PPO policies (and of PPO checkpoints
   along the way): mean gold reward, mean proxy reward and ``KL(π‖π_SFT)`` estimated per sequence
   as ``Σ_t (log π(y_t) − log π_SFT(y_t))`` over the sampled response (k1, unbiased), averaged
   over prompts; the reward model's accuracy on held-out pairs against the simulated labels and
   against the noiseless gold order.

Writes into ``out_dir``: ``sft/``, ``reward/``, ``ppo/`` (each trainer's checkpoints, JSONL and
TensorBoard logs, Hugging Face export), ``training_curves.png``, ``reward_vs_kl.png``,
``samples.md``, ``summary.json`` (keys below) and ``summary.md``.

``summary.json``: ``{"task", "seed", "sft": {"gold_reward", "proxy_reward", "kl", ...},
"reward_model": {"heldout_accuracy", "gold_accuracy", ...}, "ppo": {"gold_reward", "proxy_reward",
"kl", "kl_target", ...}, "curve": [...], "stage_seconds": {...}, "wall_seconds"}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from rlhf_jax.config import ConfigError, apply_overrides, dump_json, format_config, load_config_file
from rlhf_jax.models import lora
from rlhf_jax.data import DataConfig
from rlhf_jax.evaluation import (evaluate_policy, evaluate_reward_model, plot_reward_vs_kl, plot_training_curves,
                                 read_metrics)
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection, train_ppo
from rlhf_jax.rl.trainer import validate_rl_config
from rlhf_jax.tasks import get_task, list_tasks
from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.reward import RewardConfig, load_reward_shift, train_reward
from rlhf_jax.training.sft import SFTConfig, train_sft

# The pipeline's public names; the held-out evaluation helpers are rlhf_jax.evaluation's, listed
# here because the pipeline is where they are documented and tested from.
__all__ = [
    "EvalSection", "PipelineConfig", "stage_configs", "run_pipeline", "write_summary_md",
    "add_arguments", "config_from_args", "run",
]


# ------------------------------------------------------------------------------------------ config

def _sft_defaults():
    return SFTConfig(
        model=ModelSection(name="task"), data=DataConfig(batch_size=32, max_length=64),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20), steps=200, eval_every=100,
        eval_batches=2, checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False))


def _reward_defaults():
    return RewardConfig(
        model=ModelSection(name="task"), data=DataConfig(batch_size=32, max_length=24, pack=False),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=10), steps=200, eval_every=100,
        eval_batches=2, checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False))


def _ppo_defaults():
    # Adaptive β (Ziegler et al.) aiming at 5 nats per sequence; horizon 500 sequences lets β react
    # within a few iterations of 64 rollouts (the default 10000 is tuned for long runs).
    # sample_every=0: summary.md shows held-out samples (samples.jsonl would repeat them).
    return PPOTrainConfig(
        value_init="reward", reward=RewardSection(kind="model"),
        ppo=PPOConfig(batch_size=64, ppo_epochs=4, minibatches=2, adaptive_kl=True,
                      hparams=PPOHParams(kl_coef=0.1, kl_target=5.0, kl_horizon=500.0, lr=3e-4)),
        optim=RL_OPTIM, iterations=40, sample_every=0, num_samples=4,
        checkpoint=CheckpointConfig(every=10, keep=5), log=LogConfig(every=1, progress=False))


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation. ``num_prompts`` test prompts, sampled at ``temperature`` (the PPO
    sampling temperature, so the KL is the one PPO controls); ``num_pairs`` test pairs for the
    reward model's accuracies; ``curve_points`` PPO checkpoints evaluated for the reward-vs-KL
    curve (0 = only the final policy); ``num_samples`` decoded samples written to samples.md."""
    num_prompts: int = 256
    batch_size: int = 128
    temperature: float = 1.0
    num_pairs: int = 512
    curve_points: int = 4
    num_samples: int = 8

    def validate(self, prefix: str = "eval.") -> None:
        for key in ("num_prompts", "batch_size", "num_pairs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {prefix + key!r}: must be >= 1, got {getattr(self, key)}")
        for key in ("curve_points", "num_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key {prefix + key!r}: must be >= 0, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError(f"config key {prefix + 'temperature'!r}: must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One pipeline run. The three stage sections are the trainers' own configs; the pipeline
    sets in each of them ``task``, ``seed``, ``out_dir`` (``<out_dir>/<stage>``) and the model
    paths that chain the stages, and leaves every other field as given (override any with
    ``sft.optim.learning_rate=...``, ``reward.steps=...``, ``ppo.ppo.kl_coef=...``).

    ``init_from``: a Hugging Face model directory to start SFT from instead of the task's tiny
    config trained from scratch (its tokenizer must be the task's). ``label_noise``: the
    simulated labeller's BT temperature (< 0: the task default). ``reward_from_sft``: initialise
    the reward model's trunk from the SFT policy (InstructGPT) instead of from scratch.
    ``overwrite``: replace ``out_dir`` if it holds an earlier pipeline run (else a non-empty
    ``out_dir`` is refused).
    """
    task: str = "sentiment"
    seed: int = 0
    out_dir: str = "runs/pipeline"
    init_from: str = ""
    label_noise: float = -1.0
    reward_from_sft: bool = True
    overwrite: bool = False
    sft: Any = dataclasses.field(default_factory=_sft_defaults)
    reward: Any = dataclasses.field(default_factory=_reward_defaults)
    ppo: Any = dataclasses.field(default_factory=lambda: _ppo_defaults())
    eval: EvalSection = EvalSection()

    def validate(self) -> "PipelineConfig":
        if self.task not in list_tasks():
            raise ConfigError(f"config key 'task': unknown task {self.task!r}; choose from {list_tasks()}")
        if self.seed < 0:
            raise ConfigError(f"config key 'seed': must be >= 0, got {self.seed}")
        if not self.out_dir:
            raise ConfigError("config key 'out_dir': empty")
        if self.init_from and not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise ConfigError(f"config key 'init_from': {self.init_from!r} is not a Hugging Face model "
                              f"directory (no config.json)")
        self.eval.validate()
        for key, section, dropout_ok in (("sft.model.", self.sft.model, True), ("reward.model.", self.reward.model, True),
                                         ("ppo.policy.", self.ppo.policy, False)):  # RL: no LoRA dropout
            section.validate_lora(key, lora_dropout_ok=dropout_ok)
        return self


# ------------------------------------------------------------------------------------------ reports

def write_summary_md(path: str, summary: dict, command: str) -> str:
    s, rm, p = summary["sft"], summary["reward_model"], summary["ppo"]
    lines = [
        f"# rlhf_jax pipeline: task `{summary['task']}`, seed {summary['seed']}",
        "",
        f"`{command}` — {summary['wall_seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} s CPU "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['stage_seconds'].items())}); "
        f"{summary.get('device', '')}",
        "",
        "| policy | gold reward | proxy reward | KL to SFT | length | EOS |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in (("SFT", s), ("PPO", p)):
        lines.append(f"| {name} | {e['gold_reward']:.3f} ± {e['gold_reward_se']:.3f} | "
                     f"{e['proxy_reward']:.3f} ± {e['proxy_reward_se']:.3f} | {e['kl']:.2f} ± {e['kl_se']:.2f} | "
                     f"{e['response_length']:.1f} | {e['stop_fraction']:.2f} |")
    lines += [
        "",
        f"PPO − SFT gold reward: **{p['gold_reward'] - s['gold_reward']:+.3f}** "
        f"(target ≥ +0.15) at KL {p['kl']:.2f} (KL target {p['kl_target']}, limit 2× = "
        f"{2 * p['kl_target'] if p['kl_target'] else 'n/a'}).",
        "",
        f"Reward model on {rm['num_pairs']} held-out pairs: accuracy vs simulated labels "
        f"{rm['heldout_accuracy']:.3f}, vs noiseless gold order **{rm['gold_accuracy']:.3f}** "
        f"(target ≥ 0.75); the labeller itself agrees with gold on {rm['labeller_gold_agreement']:.3f} "
        f"(BT noise {rm['label_noise']}); score–gold correlation {rm['score_gold_correlation']:.3f}.",
        "",
        "![training curves](training_curves.png)",
        "",
        "![gold and proxy reward vs KL](reward_vs_kl.png)",
        "",
        "## Samples (held-out prompts)",
        "",
    ]
    for name, e in (("SFT", s), ("PPO", p)):
        lines.append(f"**{name}**")
        lines.append("")
        for smp in e.get("samples", []):
            lines.append(f"- `{smp['prompt']}` → `{smp['response']}` (gold {smp['gold']:.2f}, "
                         f"proxy {smp['proxy']:.2f})")
        lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ stages

def stage_configs(cfg: PipelineConfig, *, sft_export: str = "", reward_export: str = ""):
    """The three trainers' configs as the pipeline runs them (task, seed, out dirs, model chain)."""
    task = get_task(cfg.task)
    out = Path(cfg.out_dir)
    sft_model = cfg.sft.model
    if cfg.init_from:
        sft_model = dataclasses.replace(sft_model, path=cfg.init_from)
    sft = dataclasses.replace(cfg.sft, task=cfg.task, seed=cfg.seed, out_dir=str(out / "sft"), export=True,
                              model=sft_model, resume=False)
    rm_model = cfg.reward.model
    if cfg.reward_from_sft and sft_export:
        rm_model = dataclasses.replace(rm_model, path=sft_export)
    reward = dataclasses.replace(cfg.reward, task=cfg.task, seed=cfg.seed, out_dir=str(out / "reward"),
                                 export=True, model=rm_model, label_noise=cfg.label_noise, resume=False)
    ppo_algo = dataclasses.replace(cfg.ppo.ppo, max_new_tokens=task.response_length)
    ppo = dataclasses.replace(
        cfg.ppo, task=cfg.task, seed=cfg.seed, out_dir=str(out / "ppo"), export=True, resume=False,
        policy=dataclasses.replace(cfg.ppo.policy, path=sft_export),
        reward=dataclasses.replace(cfg.ppo.reward, kind="model", path=reward_export), ppo=ppo_algo)
    return sft, reward, ppo


def _curve_steps(cfg: PipelineConfig, ppo_cfg) -> list[int]:
    if cfg.eval.curve_points <= 0:
        return []
    every = max(1, ppo_cfg.iterations // cfg.eval.curve_points)
    return [s for s in range(every, ppo_cfg.iterations, every)][: cfg.eval.curve_points - 1]


def run_pipeline(cfg: PipelineConfig, *, command: str = "") -> dict[str, Any]:
    """Runs SFT → reward model → PPO → evaluation; writes ``cfg.out_dir``; returns the summary."""
    cfg.validate()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    task = get_task(cfg.task)
    out = Path(cfg.out_dir)
    _prepare_out_dir(cfg, out)
    noise = task.default_noise if cfg.label_noise < 0 else cfg.label_noise

    def log(msg: str) -> None:
        print(f"[pipeline {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    curve_steps = _validated_curve_steps(cfg)
    stages = _train_stages(cfg, noise, curve_steps, log)
    t = time.perf_counter()
    log("evaluation on held-out prompts")
    evals = _evaluate_stages(cfg, task, noise, stages, curve_steps)
    stages.seconds["evaluation"] = time.perf_counter() - t
    summary = _summary(cfg, stages, evals)
    plot_training_curves(str(out / "training_curves.png"), read_metrics(stages.sft.metrics_path),
                         read_metrics(stages.rm.metrics_path), read_metrics(stages.ppo.metrics_path))
    plot_reward_vs_kl(str(out / "reward_vs_kl.png"), evals.curve, evals.sft, summary["ppo"]["kl_target"])
    summary["wall_seconds"] = time.perf_counter() - t_start
    # CPU seconds of all threads of this process: on a shared machine wall time mostly measures the
    # other tenants, this measures us
    summary["cpu_seconds"] = time.process_time() - cpu_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_summary_md(str(out / "summary.md"), summary, command or f"rlhf-jax pipeline --task {cfg.task} "
                     f"--seed {cfg.seed} --out {cfg.out_dir}")
    log(f"done: SFT gold {evals.sft['gold_reward']:.3f} -> PPO gold {evals.ppo['gold_reward']:.3f} "
        f"(proxy {evals.ppo['proxy_reward']:.2f}, KL {evals.ppo['kl']:.2f}); reward model gold accuracy "
        f"{evals.rm['gold_accuracy']:.3f}; {summary['wall_seconds']:.0f} s; {out / 'summary.md'}")
    return summary


def _prepare_out_dir(cfg: PipelineConfig, out: Path) -> None:
    """Refuses a non-empty ``out`` (unless ``overwrite`` and it holds an earlier pipeline run, which
    is removed), creates it and writes ``pipeline_config.json``."""
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite and (out / "pipeline_config.json").is_file():
            shutil.rmtree(out)
        else:
            raise ConfigError(
                f"--out {str(out)!r} is not empty; choose a new directory (each stage writes checkpoints "
                f"there)" + (" or pass --overwrite to replace an earlier pipeline run" if not cfg.overwrite
                             else "; --overwrite only replaces an earlier pipeline run (no "
                                  "pipeline_config.json there)"))
    out.mkdir(parents=True, exist_ok=True)
    dump_json(cfg, out / "pipeline_config.json")


def _validated_curve_steps(cfg: PipelineConfig) -> list[int]:
    """Validates the PPO section before minutes are spent on SFT and the reward model; returns the
    PPO iterations whose checkpoints the reward-vs-KL curve evaluates."""
    _, _, ppo_probe = stage_configs(cfg)
    validate_rl_config(dataclasses.replace(ppo_probe, reward=dataclasses.replace(ppo_probe.reward, kind="gold"),
                                           value_init="policy"))
    return _curve_steps(cfg, ppo_probe)


@dataclasses.dataclass
class _Stages:
    """The three trained stages: each one's config as run and its trainer's result, and the seconds
    each stage took (``evaluation`` is added after them)."""
    sft_cfg: Any
    sft: Any
    rm_cfg: Any
    rm: Any
    ppo_cfg: Any
    ppo: Any
    seconds: dict[str, float]


def _train_stages(cfg: PipelineConfig, noise: float, curve_steps: list[int],
                  log: Callable[[str], None]) -> _Stages:
    """SFT, then the reward model (from the SFT export), then PPO (from both exports)."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    sft_cfg, _, _ = stage_configs(cfg)
    log(f"SFT: {sft_cfg.steps} steps on {cfg.task!r} demonstrations")
    sft_res = train_sft(sft_cfg)
    seconds["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    _, rm_cfg, _ = stage_configs(cfg, sft_export=sft_res.export_dir)
    log(f"reward model: {rm_cfg.steps} steps on simulated preferences (BT noise {noise})")
    rm_res = train_reward(rm_cfg)
    seconds["reward_model"] = time.perf_counter() - t

    t = time.perf_counter()
    _, _, ppo_cfg = stage_configs(cfg, sft_export=sft_res.export_dir, reward_export=rm_res.export_dir)
    if curve_steps:  # keep the checkpoints the reward-vs-KL curve evaluates
        ppo_cfg = dataclasses.replace(ppo_cfg, checkpoint=CheckpointConfig(
            every=curve_steps[0], keep=len(curve_steps) + 2, async_save=ppo_cfg.checkpoint.async_save))
    log(f"PPO: {ppo_cfg.iterations} iterations x {ppo_cfg.ppo.batch_size} rollouts against the learned "
        f"reward model (KL target {ppo_cfg.ppo.kl_target if ppo_cfg.ppo.adaptive_kl else 'fixed beta'})")
    ppo_res = train_ppo(ppo_cfg)
    seconds["ppo"] = time.perf_counter() - t
    return _Stages(sft_cfg, sft_res, rm_cfg, rm_res, ppo_cfg, ppo_res, seconds)


@dataclasses.dataclass
class _Evals:
    """Held-out evaluations: the SFT and PPO policies, the reward model (and its recorded shift),
    and the reward-vs-KL curve (intermediate PPO checkpoints, then the final policy)."""
    sft: dict
    ppo: dict
    rm: dict
    shift: float
    curve: list[dict]


def _merged(model, params):
    """A LoRA policy's params with the adapters merged (what the plain SFT module evaluates)."""
    return lora.merged(model, params)[1] if lora.is_lora_params(params) else params


def _evaluate_stages(cfg: PipelineConfig, task, noise: float, stages: _Stages, curve_steps: list[int]) -> _Evals:
    policy_model, sft_params = stages.sft.model, stages.sft.state.params
    reward_model, reward_params = stages.rm.model, stages.rm.state.params
    shift = load_reward_shift(stages.rm.export_dir) if stages.rm.export_dir else 0.0
    prompts = [r["prompt"] for r in task.prompt_records("test", num=cfg.eval.num_prompts)]
    eval_kw = dict(prompts=prompts, seed=cfg.seed, temperature=cfg.eval.temperature,
                   batch_size=cfg.eval.batch_size, reward_shift=shift, num_samples=cfg.eval.num_samples)
    sft_eval = evaluate_policy(task, policy_model, sft_params, sft_params, reward_model, reward_params, **eval_kw)
    ppo_params = _merged(stages.ppo.model, stages.ppo.state.policy.params)
    ppo_eval = evaluate_policy(task, policy_model, ppo_params, sft_params, reward_model, reward_params, **eval_kw)
    rm_eval = evaluate_reward_model(task, reward_model, reward_params, noise=noise,
                                    num_pairs=cfg.eval.num_pairs)

    def evaluate_params(params) -> dict:
        return evaluate_policy(task, policy_model, _merged(stages.ppo.model, params), sft_params, reward_model, reward_params,
                               **{**eval_kw, "num_samples": 0})

    curve = _checkpoint_curve(stages, curve_steps, evaluate_params)
    curve.append({"iteration": stages.ppo_cfg.iterations, **{k: v for k, v in ppo_eval.items() if k != "samples"}})
    return _Evals(sft=sft_eval, ppo=ppo_eval, rm=rm_eval, shift=shift, curve=curve)


def _checkpoint_curve(stages: _Stages, curve_steps: list[int], evaluate_params: Callable[[Any], dict]) -> list[dict]:
    """``evaluate_params`` of the PPO policy at each of ``curve_steps`` (restored checkpoints)."""
    curve: list[dict] = []
    if not curve_steps:
        return curve
    ppo_res = stages.ppo
    with CheckpointManager(Path(ppo_res.checkpoint_dir), stages.ppo_cfg.checkpoint) as mgr:
        for step in curve_steps:
            if step not in mgr.all_steps():
                raise FileNotFoundError(f"PPO checkpoint for iteration {step} missing under "
                                        f"{ppo_res.checkpoint_dir} (have {mgr.all_steps()})")
            params = mgr.restore(ppo_res.state, step=step).state.policy.params
            e = evaluate_params(params)
            curve.append({"iteration": step, **{k: v for k, v in e.items() if k != "samples"}})
    return curve


def _summary(cfg: PipelineConfig, stages: _Stages, evals: _Evals) -> dict[str, Any]:
    """``summary.json``'s content but the wall and CPU seconds."""
    sft_res, rm_res, ppo_res, ppo_cfg = stages.sft, stages.rm, stages.ppo, stages.ppo_cfg
    kl_target = float(ppo_cfg.ppo.kl_target) if ppo_cfg.ppo.adaptive_kl else None
    return {
        "task": cfg.task,
        "seed": cfg.seed,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "sft": {**evals.sft, "steps": stages.sft_cfg.steps, "train_loss": sft_res.train_metrics.get("loss"),
                "export_dir": sft_res.export_dir},
        "reward_model": {**evals.rm, "steps": stages.rm_cfg.steps,
                         "train_accuracy": rm_res.train_metrics.get("accuracy"),
                         "reward_shift": evals.shift, "export_dir": rm_res.export_dir},
        "ppo": {**evals.ppo, "kl_target": kl_target, "iterations": ppo_cfg.iterations,
                "batch_size": ppo_cfg.ppo.batch_size, "final_beta": ppo_res.train_metrics.get("kl_coef_next"),
                "train_score": ppo_res.train_metrics.get("score"), "train_kl": ppo_res.train_metrics.get("kl"),
                "gold_gain": evals.ppo["gold_reward"] - evals.sft["gold_reward"], "export_dir": ppo_res.export_dir},
        "curve": evals.curve,
        "stage_seconds": stages.seconds,
    }


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="embedded task (default: the config's, 'sentiment')")
    parser.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    parser.add_argument("--out", default=None, help="output directory (default runs/pipeline); must be new or empty")
    parser.add_argument("--config", default=None, help="experiments/*.py with get_config() -> PipelineConfig")
    parser.add_argument("--init-from", default=None, help="Hugging Face model directory to start SFT from")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train the PPO policy (and critic) as LoRA adapters of this rank on the SFT model "
                             "(= ppo.policy.lora_rank; default 0: full fine-tune), with the task model's tied "
                             "embedding (its LM head) trained as a copy unless ppo.policy.lora_modules_to_save is "
                             "given (= ppo.policy.lora_modules_to_save=[\"embed_tokens\"]; [] for adapters only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds an earlier pipeline run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated), one 'key = value  "
                             "# doc (default: X)' line per key, and exit without building or writing anything")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. sft.steps=300 ppo.ppo.kl_target=4 ppo.iterations=60")


def config_from_args(args) -> PipelineConfig:
    cfg = load_config_file(args.config) if args.config else PipelineConfig()
    if not isinstance(cfg, PipelineConfig):
        raise ConfigError(f"config file {args.config!r}: get_config() returned {type(cfg).__name__}, "
                          f"expected PipelineConfig")
    cfg = apply_overrides(cfg, args.overrides or [])
    for flag, key in ((args.task, "task"), (args.seed, "seed"), (args.out, "out_dir"),
                      (args.init_from, "init_from")):
        if flag is not None:
            cfg = dataclasses.replace(cfg, **{key: flag})
    if args.overwrite:
        cfg = dataclasses.replace(cfg, overwrite=True)
    if getattr(args, "lora_rank", None) is not None:
        cfg = apply_overrides(cfg, [f"ppo.policy.lora_rank={args.lora_rank}"])
        given = any(o.split("=", 1)[0].strip() == "ppo.policy.lora_modules_to_save" for o in args.overrides or [])
        if args.lora_rank and not given and not cfg.init_from:
            # the task models tie a small embedding that is also the LM head; adapters on the projections
            # alone cannot move it, and PPO then drifts (stops emitting EOS): README, "LoRA"
            cfg = apply_overrides(cfg, ['ppo.policy.lora_modules_to_save=["embed_tokens"]'])
    return cfg.validate()


def run(args) -> int:
    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(format_config(cfg), end="")
        return 0
    command = ""
    if len(sys.argv) > 1 and sys.argv[1] == "pipeline":  # launched as `rlhf-jax pipeline ...`
        command = " ".join(["rlhf-jax"] + sys.argv[1:])
    run_pipeline(cfg, command=command)
    return 0
