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
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError, apply_overrides, dump_json, load_config_file, to_dict


# ------------------------------------------------------------------------------------------ config

def _sft_defaults():
    from rlhf_jax.data import DataConfig
    from rlhf_jax.training.checkpoint import CheckpointConfig
    from rlhf_jax.training.configs import ModelSection
    from rlhf_jax.training.metrics import LogConfig
    from rlhf_jax.training.optim import OptimConfig
    from rlhf_jax.training.sft import SFTConfig

    return SFTConfig(
        model=ModelSection(name="task"), data=DataConfig(batch_size=32, max_length=64),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20), steps=200, eval_every=100,
        eval_batches=2, checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False))


def _reward_defaults():
    from rlhf_jax.data import DataConfig
    from rlhf_jax.training.checkpoint import CheckpointConfig
    from rlhf_jax.training.configs import ModelSection
    from rlhf_jax.training.metrics import LogConfig
    from rlhf_jax.training.optim import OptimConfig
    from rlhf_jax.training.reward import RewardConfig

    return RewardConfig(
        model=ModelSection(name="task"), data=DataConfig(batch_size=32, max_length=24, pack=False),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=10), steps=200, eval_every=100,
        eval_batches=2, checkpoint=CheckpointConfig(every=0, keep=1),
        log=LogConfig(every=10, progress=False))


def _ppo_defaults():
    from rlhf_jax.rl.config import PPOConfig
    from rlhf_jax.rl.trainer import RL_OPTIM, PPOTrainConfig, RewardSection
    from rlhf_jax.training.checkpoint import CheckpointConfig
    from rlhf_jax.training.metrics import LogConfig

    # Adaptive β (Ziegler et al.) aiming at 5 nats per sequence; horizon 500 sequences lets β react
    # within a few iterations of 64 rollouts (the spec's 10000 is tuned for long runs).
    # sample_every=0: summary.md shows held-out samples; logging rollout samples would also compile
    # the split rollout/update programs next to the fused iteration.
    return PPOTrainConfig(
        value_init="reward", reward=RewardSection(kind="model"),
        ppo=PPOConfig(batch_size=64, ppo_epochs=4, minibatches=2, adaptive_kl=True, kl_coef=0.1,
                      kl_target=5.0, kl_horizon=500.0, lr=3e-4),
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
        from rlhf_jax.tasks import list_tasks
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
        return self


# ------------------------------------------------------------------------------------------ evaluation

def encode_prompts(task, prompts: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-padded ``(prompt_ids, prompt_mask)`` ``[B, P]`` int32 with the task's word-level ids
    (the same ids its tokenizer directory gives; ``P`` defaults to ``task.prompt_length``)."""
    length = length or task.prompt_length
    ids = np.full((len(prompts), length), task.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, text in enumerate(prompts):
        enc = task.encode(text)
        if not 0 < len(enc) <= length:
            raise ValueError(f"prompt {i} {text!r}: {len(enc)} tokens, expected 1..{length}")
        ids[i, length - len(enc):] = enc
        mask[i, length - len(enc):] = 1
    return ids, mask


def encode_responses(task, responses: Sequence[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RIGHT-padded ``(response_ids, response_mask)`` ``[B, R]``: the words then EOS (as the data
    layer tokenises a completion and as a finished rollout looks)."""
    length = length or task.response_length
    ids = np.full((len(responses), length), task.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, text in enumerate(responses):
        enc = task.encode(text) + [task.eos_id]
        if len(enc) > length:
            raise ValueError(f"response {i} {text!r}: {len(enc)} tokens with EOS, more than {length}")
        ids[i, :len(enc)] = enc
        mask[i, :len(enc)] = 1
    return ids, mask


@functools.partial(jax.jit,
                   static_argnames=("policy_model", "reward_model", "gold_fn", "max_new_tokens",
                                    "eos_id", "pad_id"))
def _eval_batch(policy_params, ref_params, reward_params, reward_shift, prompt_ids, prompt_mask, rng,
                temperature, *, policy_model, reward_model, gold_fn, max_new_tokens, eos_id, pad_id):
    """Sample one response per prompt and score it: gold, proxy, per-sequence k1 KL to the ref."""
    from rlhf_jax.generation import generate
    from rlhf_jax.rl.rollout import policy_forward, reward_model_scores

    out = generate(policy_model, policy_params, prompt_ids, prompt_mask, rng=rng,
                   max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=(eos_id,),
                   pad_token_id=pad_id, prompt_buckets=(prompt_ids.shape[1],))
    tokens, mask = out.tokens, out.mask
    gold = gold_fn(prompt_ids, prompt_mask, tokens, mask)
    proxy = reward_model_scores(reward_model, reward_params, prompt_ids, prompt_mask, tokens, mask) + reward_shift
    ref_logp = policy_forward(policy_model, ref_params, prompt_ids, prompt_mask, tokens, mask, temperature,
                              with_entropy=False)["logp"]
    kl = jnp.sum((out.logprobs - ref_logp) * mask, axis=-1)
    return {"tokens": tokens, "gold": gold, "proxy": proxy, "kl": kl,
            "length": jnp.sum(mask, axis=-1), "stopped": jnp.any((tokens == eos_id) & (mask > 0), axis=-1)}


def evaluate_policy(task, policy_model, policy_params, ref_params, reward_model, reward_params, *,
                    prompts: Sequence[str], seed: int, temperature: float = 1.0, batch_size: int = 128,
                    reward_shift: float = 0.0, num_samples: int = 0) -> dict[str, Any]:
    """Mean gold reward, proxy (reward-model) reward and ``KL(π‖π_ref)`` on ``prompts``.

    One sampled response per prompt (temperature ``temperature``, stop at EOS, at most
    ``task.response_length`` tokens). ``kl`` is the mean over prompts of
    ``Σ_t log π(y_t|·) − log π_ref(y_t|·)`` on the sampled tokens (both at the same temperature),
    an unbiased estimate of the sequence-level KL. Also: standard errors, mean response length,
    fraction that emitted EOS and ``num_samples`` decoded samples.
    """
    ids, mask = encode_prompts(task, prompts)
    n = len(prompts)
    bs = min(batch_size, n)
    pad_rows = (-n) % bs
    if pad_rows:  # one compiled shape: repeat the first prompt, drop its scores afterwards
        ids = np.concatenate([ids, np.repeat(ids[:1], pad_rows, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad_rows, 0)])
    key = jax.random.PRNGKey(seed)
    parts = []
    for i in range(0, len(ids), bs):
        parts.append(jax.device_get(_eval_batch(
            policy_params, ref_params, reward_params, jnp.float32(reward_shift), ids[i:i + bs],
            mask[i:i + bs], jax.random.fold_in(key, i), jnp.float32(temperature),
            policy_model=policy_model, reward_model=reward_model, gold_fn=task.gold_reward_jax,
            max_new_tokens=task.response_length, eos_id=task.eos_id, pad_id=task.pad_id)))
    res = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}

    def mean_se(x):
        x = np.asarray(x, np.float64)
        return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0

    out: dict[str, Any] = {}
    for k in ("gold", "proxy", "kl"):
        m, se = mean_se(res[k])
        out[{"gold": "gold_reward", "proxy": "proxy_reward", "kl": "kl"}[k]] = m
        out[{"gold": "gold_reward_se", "proxy": "proxy_reward_se", "kl": "kl_se"}[k]] = se
    out["response_length"] = float(res["length"].mean())
    out["stop_fraction"] = float(res["stopped"].mean())
    out["num_prompts"] = n
    out["samples"] = [{"prompt": prompts[i], "response": task.decode(res["tokens"][i]),
                       "gold": float(res["gold"][i]), "proxy": float(res["proxy"][i])}
                      for i in range(min(num_samples, n))]
    return out


@functools.partial(jax.jit, static_argnames=("reward_model",))
def _score_batch(reward_params, p_ids, p_mask, r_ids, r_mask, *, reward_model):
    from rlhf_jax.rl.rollout import reward_model_scores
    return reward_model_scores(reward_model, reward_params, p_ids, p_mask, r_ids, r_mask)


def score_responses(task, reward_model, reward_params, prompts: Sequence[str], responses: Sequence[str],
                    *, batch_size: int = 256) -> np.ndarray:
    """Reward-model scores ``[N]`` of text (prompt, response) pairs (response + EOS)."""

    p_ids, p_mask = encode_prompts(task, prompts)
    r_ids, r_mask = encode_responses(task, responses)
    n = len(prompts)
    pad_rows = (-n) % batch_size if n > batch_size else 0
    bs = min(batch_size, n)
    arrays = [p_ids, p_mask, r_ids, r_mask]
    if pad_rows:
        arrays = [np.concatenate([a, np.repeat(a[:1], pad_rows, 0)]) for a in arrays]
    out = [jax.device_get(_score_batch(reward_params, *(a[i:i + bs] for a in arrays), reward_model=reward_model))
           for i in range(0, len(arrays[0]), bs)]
    return np.concatenate(out)[:n].astype(np.float64)


def evaluate_reward_model(task, reward_model, reward_params, *, noise: float, num_pairs: int,
                          batch_size: int = 256) -> dict[str, float]:
    """Accuracy of the reward model on held-out (``test``) pairs.

    ``heldout_accuracy``: agreement with the simulated labeller's choice (BT noise ``noise``);
    ``gold_accuracy``: agreement with the noiseless gold order of the same pairs (never tied);
    ``score_gold_correlation``: Pearson correlation of scores and gold over all responses.
    """
    noisy = task.preference_records("test", noise, num=num_pairs, with_gold=True)
    gold = task.preference_records("test", 0.0, num=num_pairs, with_gold=True)
    prompts = [r["prompt"] for r in noisy] * 2
    responses = [r["chosen"] for r in noisy] + [r["rejected"] for r in noisy]
    scores = score_responses(task, reward_model, reward_params, prompts, responses, batch_size=batch_size)
    s_c, s_r = scores[:num_pairs], scores[num_pairs:]
    by_text = {(p, r): s for p, r, s in zip(prompts, responses, scores)}
    g_c = np.array([by_text[(r["prompt"], r["chosen"])] for r in gold])
    g_r = np.array([by_text[(r["prompt"], r["rejected"])] for r in gold])
    golds = np.array([r["chosen_gold"] for r in noisy] + [r["rejected_gold"] for r in noisy])
    label_gold_agreement = float(np.mean([a["chosen"] == b["chosen"] for a, b in zip(noisy, gold)]))
    return {
        "heldout_accuracy": float(np.mean(s_c > s_r)),
        "gold_accuracy": float(np.mean(g_c > g_r)),
        "labeller_gold_agreement": label_gold_agreement,
        "score_gold_correlation": float(np.corrcoef(scores, golds)[0, 1]),
        "num_pairs": int(num_pairs),
        "label_noise": float(noise),
    }


# ------------------------------------------------------------------------------------------ reports

def _read_metrics(path) -> list[dict]:
    from rlhf_jax.training.metrics import read_jsonl
    return read_jsonl(path) if path and os.path.isfile(path) else []


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _first_key(records: list[dict], candidates: Sequence[str]) -> str | None:
    for key in candidates:
        if any(key in r for r in records):
            return key
    return None


def plot_training_curves(path: str, sft_metrics: list[dict], reward_metrics: list[dict],
                         ppo_metrics: list[dict]) -> str:
    """Training curves (one panel per quantity) as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("SFT loss", sft_metrics, ["train/loss", "eval/loss"]),
        ("reward model accuracy", reward_metrics, ["train/accuracy", "eval/accuracy"]),
        ("PPO proxy score", ppo_metrics, ["train/score", "train/scores", "train/score_mean"]),
        ("PPO KL to SFT (per sequence)", ppo_metrics, ["train/kl", "train/objective/kl", "train/kl_mean"]),
        ("PPO beta", ppo_metrics, ["train/kl_coef", "train/beta"]),
        ("PPO response length", ppo_metrics, ["train/response_length", "train/length"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, records, keys) in zip(axes.ravel(), panels):
        drawn = False
        for key in keys:
            steps, vals = _series(records, key)
            if steps:
                ax.plot(steps, vals, marker="." if len(steps) < 30 else None, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_reward_vs_kl(path: str, curve: list[dict], sft_eval: dict, kl_target: float | None) -> str:
    """Gold and proxy reward of held-out samples vs KL(π‖π_SFT) along PPO (Gao et al. 2022)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [{"kl": 0.0, "gold_reward": sft_eval["gold_reward"], "proxy_reward": sft_eval["proxy_reward"],
            "iteration": 0}] + list(curve)
    kl = [p["kl"] for p in pts]
    fig, ax1 = plt.subplots(figsize=(6.5, 4.5))
    ax1.plot(kl, [p["gold_reward"] for p in pts], "o-", color="tab:green", label="gold reward")
    ax1.set_xlabel("KL(π ‖ π_SFT), nats per sequence (held-out prompts)")
    ax1.set_ylabel("gold reward", color="tab:green")
    ax1.set_ylim(0, 1)
    ax2 = ax1.twinx()
    ax2.plot(kl, [p["proxy_reward"] for p in pts], "s--", color="tab:blue", label="proxy (reward model)")
    ax2.set_ylabel("proxy reward", color="tab:blue")
    for p in pts:
        ax1.annotate(str(p["iteration"]), (p["kl"], p["gold_reward"]), fontsize=7,
                     textcoords="offset points", xytext=(3, 3))
    if kl_target:
        ax1.axvline(kl_target, color="gray", ls=":", label="KL target")
        ax1.axvline(2 * kl_target, color="red", ls=":", label="2 × KL target")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax1.set_title("gold vs proxy reward along PPO (labels: iteration)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
    from rlhf_jax.tasks import get_task

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
    from rlhf_jax.rl.trainer import train_ppo
    from rlhf_jax.tasks import get_task
    from rlhf_jax.training.checkpoint import CheckpointConfig, CheckpointManager
    from rlhf_jax.training.reward import load_reward_shift, train_reward
    from rlhf_jax.training.sft import train_sft

    cfg.validate()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    task = get_task(cfg.task)
    out = Path(cfg.out_dir)
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
    noise = task.default_noise if cfg.label_noise < 0 else cfg.label_noise
    stage_seconds: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[pipeline {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # Validate the PPO section before spending minutes on SFT and the reward model.
    _, _, ppo_probe = stage_configs(cfg)
    from rlhf_jax.rl.trainer import validate_rl_config
    validate_rl_config(dataclasses.replace(ppo_probe, reward=dataclasses.replace(ppo_probe.reward, kind="gold"),
                                           value_init="policy"))
    curve_steps = _curve_steps(cfg, ppo_probe)

    t = time.perf_counter()
    sft_cfg, _, _ = stage_configs(cfg)
    log(f"SFT: {sft_cfg.steps} steps on {cfg.task!r} demonstrations")
    sft_res = train_sft(sft_cfg)
    stage_seconds["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    _, rm_cfg, _ = stage_configs(cfg, sft_export=sft_res.export_dir)
    log(f"reward model: {rm_cfg.steps} steps on simulated preferences (BT noise {noise})")
    rm_res = train_reward(rm_cfg)
    stage_seconds["reward_model"] = time.perf_counter() - t

    t = time.perf_counter()
    _, _, ppo_cfg = stage_configs(cfg, sft_export=sft_res.export_dir, reward_export=rm_res.export_dir)
    if curve_steps:  # keep the checkpoints the reward-vs-KL curve evaluates
        ppo_cfg = dataclasses.replace(ppo_cfg, checkpoint=CheckpointConfig(
            every=curve_steps[0], keep=len(curve_steps) + 2, async_save=ppo_cfg.checkpoint.async_save))
    log(f"PPO: {ppo_cfg.iterations} iterations x {ppo_cfg.ppo.batch_size} rollouts against the learned "
        f"reward model (KL target {ppo_cfg.ppo.kl_target if ppo_cfg.ppo.adaptive_kl else 'fixed beta'})")
    ppo_res = train_ppo(ppo_cfg)
    stage_seconds["ppo"] = time.perf_counter() - t

    t = time.perf_counter()
    log("evaluation on held-out prompts")
    policy_model, sft_params = sft_res.model, sft_res.state.params
    reward_model, reward_params = rm_res.model, rm_res.state.params
    shift = load_reward_shift(rm_res.export_dir) if rm_res.export_dir else 0.0
    prompts = [r["prompt"] for r in task.prompt_records("test", num=cfg.eval.num_prompts)]
    eval_kw = dict(prompts=prompts, seed=cfg.seed, temperature=cfg.eval.temperature,
                   batch_size=cfg.eval.batch_size, reward_shift=shift, num_samples=cfg.eval.num_samples)
    sft_eval = evaluate_policy(task, policy_model, sft_params, sft_params, reward_model, reward_params, **eval_kw)
    ppo_params = ppo_res.state.policy.params
    ppo_eval = evaluate_policy(task, policy_model, ppo_params, sft_params, reward_model, reward_params, **eval_kw)
    rm_eval = evaluate_reward_model(task, reward_model, reward_params, noise=noise,
                                    num_pairs=cfg.eval.num_pairs)
    curve = []
    if curve_steps:
        with CheckpointManager(Path(ppo_res.checkpoint_dir), ppo_cfg.checkpoint) as mgr:
            for step in curve_steps:
                if step not in mgr.all_steps():
                    raise FileNotFoundError(f"PPO checkpoint for iteration {step} missing under "
                                            f"{ppo_res.checkpoint_dir} (have {mgr.all_steps()})")
                params = mgr.restore(ppo_res.state, step=step).state.policy.params
                e = evaluate_policy(task, policy_model, params, sft_params, reward_model, reward_params,
                                    **{**eval_kw, "num_samples": 0})
                curve.append({"iteration": step, **{k: v for k, v in e.items() if k != "samples"}})
    curve.append({"iteration": ppo_cfg.iterations, **{k: v for k, v in ppo_eval.items() if k != "samples"}})
    stage_seconds["evaluation"] = time.perf_counter() - t

    kl_target = float(ppo_cfg.ppo.kl_target) if ppo_cfg.ppo.adaptive_kl else None
    summary = {
        "task": cfg.task,
        "seed": cfg.seed,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "sft": {**sft_eval, "steps": sft_cfg.steps, "train_loss": sft_res.train_metrics.get("loss"),
                "export_dir": sft_res.export_dir},
        "reward_model": {**rm_eval, "steps": rm_cfg.steps, "train_accuracy": rm_res.train_metrics.get("accuracy"),
                         "reward_shift": shift, "export_dir": rm_res.export_dir},
        "ppo": {**ppo_eval, "kl_target": kl_target, "iterations": ppo_cfg.iterations,
                "batch_size": ppo_cfg.ppo.batch_size, "final_beta": ppo_res.train_metrics.get("kl_coef_next"),
                "train_score": ppo_res.train_metrics.get("score"), "train_kl": ppo_res.train_metrics.get("kl"),
                "gold_gain": ppo_eval["gold_reward"] - sft_eval["gold_reward"], "export_dir": ppo_res.export_dir},
        "curve": curve,
        "stage_seconds": stage_seconds,
    }
    plot_training_curves(str(out / "training_curves.png"), _read_metrics(sft_res.metrics_path),
                         _read_metrics(rm_res.metrics_path), _read_metrics(ppo_res.metrics_path))
    plot_reward_vs_kl(str(out / "reward_vs_kl.png"), curve, sft_eval, kl_target)
    summary["wall_seconds"] = time.perf_counter() - t_start
    # CPU seconds of all threads of this process: on a shared machine wall time mostly measures the
    # other tenants, this measures us
    summary["cpu_seconds"] = time.process_time() - cpu_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_summary_md(str(out / "summary.md"), summary, command or f"rlhf-jax pipeline --task {cfg.task} "
                     f"--seed {cfg.seed} --out {cfg.out_dir}")
    log(f"done: SFT gold {sft_eval['gold_reward']:.3f} -> PPO gold {ppo_eval['gold_reward']:.3f} "
        f"(proxy {ppo_eval['proxy_reward']:.2f}, KL {ppo_eval['kl']:.2f}); reward model gold accuracy "
        f"{rm_eval['gold_accuracy']:.3f}; {summary['wall_seconds']:.0f} s; {out / 'summary.md'}")
    return summary


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="embedded task (default: the config's, 'sentiment')")
    parser.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    parser.add_argument("--out", default=None, help="output directory (default runs/pipeline); must be new or empty")
    parser.add_argument("--config", default=None, help="experiments/*.py with get_config() -> PipelineConfig")
    parser.add_argument("--init-from", default=None, help="Hugging Face model directory to start SFT from")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds an earlier pipeline run")
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
    return cfg.validate()


def run(args) -> int:
    cfg = config_from_args(args)
    command = ""
    if len(sys.argv) > 1 and sys.argv[1] == "pipeline":  # launched as `rlhf-jax pipeline ...`
        command = " ".join(["rlhf-jax"] + sys.argv[1:])
    run_pipeline(cfg, command=command)
    return 0
