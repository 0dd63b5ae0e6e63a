"""The over-optimisation lab: best-of-N, RL and reward-model ensembles against a learned proxy, measured
by the task's gold reward (Gao et al. 2022; Coste et al. 2023). docs/MATH.md, "Over-optimisation".

    rlhf-jax overopt --task sentiment --out DIR [--budget tiny|small|full] [--seed S]

Stages (each the library's own trainer or RL core; nothing is re-implemented here):

1. ``training.train_sft``: the task's tiny policy on the demonstrations (the reference of everything).
2. ``training.train_reward`` with ``ensemble_size=K``: K proxy reward models (one vmapped program,
   ``num_labels`` pairs, each centred on the demonstrations, initialised from the SFT policy); member 0 is
   "the single RM". Then the two RM-scaling axes: one reward model per entry of ``label_counts`` (from the
   SFT policy), and one per entry of ``rm_sizes`` (``RM_SIZES``: the task's tiny architecture at several
   widths/depths, from scratch, on ``max(label_counts)`` pairs).
3. Best-of-N: ``rl.best_of_n.sample_n`` draws ``bon_n`` samples per test prompt from the SFT policy;
   gold and every proxy score them; the unbiased estimator gives best-of-N gold/proxy for N = 1, 2, 4,
   ... <= ``bon_n`` at ``KL = log N − (N−1)/N``.
4. RL: PPO against the single RM for every β in ``betas`` (fixed β), one ``jax.vmap``-ed program
   (``rl.core.make_train``). Every ``window`` iterations the program evaluates each run's policy on the
   best-of-N test prompts (``eval_samples`` responses each, PPO's sampling temperature;
   ``evaluation.heldout_eval_fn``): KL to the SFT policy (k1, per sequence), proxy score and gold reward.
   These held-out checkpoint evaluations are the RL curve points; the training rollouts' means over the
   same windows are kept as a secondary record (``rl_train_window``).
5. Ensembles: the same PPO at the smallest β against the K-member ensemble with
   ``reward_aggregation`` = mean and uwo (one program vmapped over ``uwo_lambda`` ∈ {0, λ}: uwo with
   λ = 0 is the mean) and wco, evaluated the same way (proxy = the aggregated reward the run optimises).
6. Fits (least squares on ``Δgold = gold(d) − gold(0)``, ``d = sqrt(KL)``): best-of-N
   ``R(d) = d(α − β d)``, RL ``R(d) = d(α − β log d)``; coefficients, R², the fitted gold peak; per
   label count and per RM size the best-of-N fit and its peak.

Writes ``results.json`` (keys ``bon``, ``rl``, ``fits``, ``ensembles``, ``rm_scaling``, ``targets``,
``budget``, ``seconds``, ``cpu_seconds``, ...), ``report.md`` and ``overopt_curves.png``, ``ensembles.png``,
``rm_scaling.png`` into ``--out`` (``sft/`` and ``reward*/`` hold the trainers' runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataConfig
from rlhf_jax.evaluation import encode_prompts, heldout_eval_fn
from rlhf_jax.rl import RL_OPTIM, PPOConfig, PPOHParams, PPOTrainConfig, RewardSection
from rlhf_jax.rl import best_of_n as bon
from rlhf_jax.rl import core
from rlhf_jax.rl.experience import reward_model_scores
from rlhf_jax.rl.trainer import build_setup
from rlhf_jax.tasks import get_task, list_tasks
from rlhf_jax.training.checkpoint import CheckpointConfig
from rlhf_jax.training.configs import ModelSection
from rlhf_jax.training.metrics import LogConfig
from rlhf_jax.training.optim import OptimConfig
from rlhf_jax.training.reward import RewardConfig, load_reward_ensemble, load_reward_shift, train_reward
from rlhf_jax.training.sft import SFTConfig, train_sft
from rlhf_jax import models


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of each stage a lab run does.

    sft_steps: SFT steps (batch 32). rm_steps / rm_batch: reward-model steps and pairs per step.
    num_labels: training pairs of the proxy ensemble. ensemble_size: K members (member 0 = the single
    RM). label_counts: one extra RM per count (the RM-scaling axis). bon_prompts × bon_n: best-of-N
    samples. betas: fixed KL coefficients of the RL runs (the smallest also runs the ensembles).
    rl_iterations × rl_batch: PPO iterations and prompts per iteration; rl_lr: its learning rate.
    window: iterations between held-out checkpoint evaluations (one RL curve point each; also the window
    of the training-rollout means). eval_samples: responses per best-of-N test prompt at each checkpoint.
    uwo_lambda: λ of the uwo ensemble run. rm_sizes: names in ``RM_SIZES``, one from-scratch RM each on
    ``max(label_counts)`` pairs (the RM-size axis; empty: no size axis).
    """
    sft_steps: int
    rm_steps: int
    rm_batch: int
    num_labels: int
    ensemble_size: int
    label_counts: tuple[int, ...]
    bon_prompts: int
    bon_n: int
    betas: tuple[float, ...]
    rl_iterations: int
    rl_batch: int
    rl_lr: float
    window: int
    eval_samples: int
    uwo_lambda: float
    rm_sizes: tuple[str, ...]


# The RM-size axis: the task's tiny llama-style architecture (``task.model_config``: d=64, 2 layers, 4 heads,
# MLP 128) at other widths/depths, each built from scratch (``ModelSection(name="task", ...)``).
RM_SIZES: dict[str, dict[str, int]] = {
    "s": dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64),
    "m": {},
    "l": dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=256),
}

BUDGETS: dict[str, Budget] = {
    # for tests and the notebook's smoke run: every stage, tiny sizes (compilation-bound, ~2-3 min)
    "tiny": Budget(sft_steps=40, rm_steps=20, rm_batch=32, num_labels=256, ensemble_size=2, label_counts=(64, 256),
                   bon_prompts=8, bon_n=16, betas=(0.0, 0.1), rl_iterations=6, rl_batch=8, rl_lr=3e-4, window=2,
                   eval_samples=2, uwo_lambda=1.0, rm_sizes=("s", "m")),
    "small": Budget(sft_steps=200, rm_steps=100, rm_batch=32, num_labels=500, ensemble_size=3,
                    label_counts=(100, 500, 2000), bon_prompts=32, bon_n=128, betas=(0.0, 0.05, 0.2),
                    rl_iterations=32, rl_batch=32, rl_lr=3e-4, window=4, eval_samples=4, uwo_lambda=1.0,
                    rm_sizes=("s", "l")),     # (no "m": ~300 CPU-s with three sizes, the promise is 5 min)
    "full": Budget(sft_steps=300, rm_steps=250, rm_batch=32, num_labels=500, ensemble_size=4,
                   label_counts=(100, 400, 1600), bon_prompts=64, bon_n=256, betas=(0.0, 0.02, 0.1, 0.3),
                   rl_iterations=100, rl_batch=64, rl_lr=3e-4, window=5, eval_samples=4, uwo_lambda=1.0,
                   rm_sizes=("s", "m", "l")),
}


# ------------------------------------------------------------------------------------------ fits

def fit_gao(d, r, form: str) -> dict[str, float]:
    """Least-squares fit of Gao et al.'s forms through the origin: ``bon``: ``R = d(α − β d)``;
    ``rl``: ``R = d(α − β log d)``. Returns ``alpha, beta, r2`` and the fitted peak ``peak_d`` (None
    when the fitted curve has no interior maximum) and ``peak_reward``."""
    d = np.asarray(d, np.float64)
    r = np.asarray(r, np.float64)
    if form not in ("bon", "rl"):
        raise ValueError(f"fit_gao: form must be 'bon' or 'rl', got {form!r}")
    keep = d > 0
    if keep.sum() < 2:
        raise ValueError(f"fit_gao: need at least 2 points with d > 0, got {int(keep.sum())}")
    dk, rk = d[keep], r[keep]
    second = dk * dk if form == "bon" else dk * np.log(dk)
    A = np.stack([dk, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, rk, rcond=None)
    pred_all = alpha * d - beta * np.where(d > 0, (d * d if form == "bon" else d * np.log(np.where(d > 0, d, 1))), 0)
    ss_res = float(np.sum((r - pred_all) ** 2))
    ss_tot = float(np.sum((r - r.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    peak_d = peak_r = None
    if beta > 0:
        if form == "bon":
            peak_d = alpha / (2 * beta)
            peak_r = alpha * alpha / (4 * beta)
        else:
            peak_d = math.exp(alpha / beta - 1.0)
            peak_r = beta * peak_d
        if not (peak_d > 0 and math.isfinite(peak_d)):
            peak_d = peak_r = None
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2,
            "peak_d": None if peak_d is None else float(peak_d),
            "peak_reward": None if peak_r is None else float(peak_r)}


# ------------------------------------------------------------------------------------------ stages

def _sft(task: str, out: Path, seed: int, b: Budget):
    cfg = SFTConfig(task=task, seed=seed, out_dir=str(out / "sft"), model=ModelSection(name="task"),
                    data=DataConfig(batch_size=32, max_length=64),
                    optim=OptimConfig(learning_rate=3e-3, warmup_steps=20), steps=b.sft_steps,
                    eval_every=b.sft_steps, eval_batches=2, checkpoint=CheckpointConfig(every=0, keep=1),
                    log=LogConfig(every=max(1, b.sft_steps // 10), progress=False))
    return train_sft(cfg)


def _reward(task: str, out: Path, name: str, seed: int, b: Budget, model: ModelSection, *, labels: int, size: int = 1):
    cfg = RewardConfig(task=task, seed=seed, out_dir=str(out / name), model=model,
                       data=DataConfig(batch_size=b.rm_batch, max_length=24, pack=False),
                       optim=OptimConfig(learning_rate=1e-3, warmup_steps=10), steps=b.rm_steps,
                       eval_every=b.rm_steps, eval_batches=4, normalize=True, calibration_batches=4,
                       ensemble_size=size, num_labels=labels, checkpoint=CheckpointConfig(every=0, keep=1),
                       log=LogConfig(every=max(1, b.rm_steps // 10), progress=False))
    return train_reward(cfg)


def _bon_scores(task, policy_model, policy_params, proxies: dict[str, tuple], b: Budget, seed: int) -> dict:
    """``{"gold": [P, n], <proxy name>: [P, n]}`` for ``bon_n`` samples of each test prompt."""
    prompts = [r["prompt"] for r in task.prompt_records("test", num=b.bon_prompts)]
    ids, mask = encode_prompts(task, prompts)
    chunk = max(1, min(len(prompts), 4096 // b.bon_n))
    key = jax.random.PRNGKey(seed + 7)
    out: dict[str, list] = {"gold": [], **{k: [] for k in proxies}}
    score = jax.jit(lambda rp, pi, pm, ri, rm, *, model: reward_model_scores(model, rp, pi, pm, ri, rm),
                    static_argnames=("model",))
    for i in range(0, len(prompts), chunk):
        p_ids, p_mask = ids[i:i + chunk], mask[i:i + chunk]
        if p_ids.shape[0] < chunk:  # one compiled shape: pad with the first prompt, drop afterwards
            pad = chunk - p_ids.shape[0]
            p_ids = np.concatenate([p_ids, np.repeat(p_ids[:1], pad, 0)])
            p_mask = np.concatenate([p_mask, np.repeat(p_mask[:1], pad, 0)])
        n_real = min(chunk, len(prompts) - i)
        s = bon.sample_n(policy_model, policy_params, p_ids, p_mask, jax.random.fold_in(key, i), jnp.float32(1.0),
                         n=b.bon_n, max_new_tokens=task.response_length, stop_token_ids=(task.eos_id,),
                         pad_token_id=task.pad_id)
        args = (s["prompt_ids"], s["prompt_mask"], s["tokens"], s["mask"])
        gold = np.asarray(task.gold_reward_jax(*args)).reshape(chunk, b.bon_n)[:n_real]
        out["gold"].append(gold)
        for name, (rm, rp, shift) in proxies.items():
            sc = np.asarray(score(rp, *args, model=rm)) + shift
            out[name].append(sc.reshape(chunk, b.bon_n)[:n_real])
    return {k: np.concatenate(v) for k, v in out.items()}


def bon_curve(scores: dict, proxy: str, ns) -> list[dict]:
    """``[{n, kl, sqrt_kl, gold, proxy}]`` of best-of-N selecting by ``scores[proxy]``."""
    est = bon.best_of_n_estimates(scores[proxy], {"gold": scores["gold"], "proxy": scores[proxy]}, ns)
    kl = bon.best_of_n_kl(ns)
    return [{"n": int(N), "kl": float(k), "sqrt_kl": float(math.sqrt(k)), "gold": float(g), "proxy": float(p)}
            for N, k, g, p in zip(ns, kl, np.asarray(est["gold"]), np.asarray(est["proxy"]))]


def _ppo_config(task: str, seed: int, b: Budget, sft_dir: str, reward_dir: str, aggregation: str = "mean"):
    return PPOTrainConfig(
        task=task, seed=seed, policy=ModelSection(path=sft_dir), reward=RewardSection(kind="model", path=reward_dir),
        value_init="policy", optim=RL_OPTIM, iterations=b.rl_iterations, sample_every=0,
        data=DataConfig(batch_size=b.rl_batch, max_length=64),
        ppo=PPOConfig(batch_size=b.rl_batch, max_new_tokens=get_task(task).response_length, ppo_epochs=4,
                      minibatches=2, adaptive_kl=False, reward_aggregation=aggregation,
                      hparams=PPOHParams(kl_coef=0.0, lr=b.rl_lr, uwo_lambda=b.uwo_lambda)))


def _rl_runs(cfg: PPOTrainConfig, task, values: dict[str, list], seed: int, eval_prompts: tuple, b: Budget
             ) -> dict[str, np.ndarray]:
    """One vmapped program of PPO runs over the grid ``values`` of traced hyper-parameters; per run and
    iteration the rollout's ``kl``, proxy ``score_raw`` and ``gold`` (means over the batch), and every
    ``b.window`` iterations the held-out evaluation of the policy on ``eval_prompts`` (``eval/kl``,
    ``eval/proxy``, ``eval/gold``, ... NaN between checkpoints; ``eval/mask``)."""
    setup = build_setup(cfg, num_prompts=8 * cfg.ppo.batch_size)
    algo = setup.algo

    def gold_of(rows):
        return {"gold": jnp.mean(task.gold_reward_jax(rows["prompt_ids"], rows["prompt_mask"], rows["response_ids"],
                                                      rows["response_mask"]))}

    evaluate = heldout_eval_fn(*eval_prompts, gold_fn=task.gold_reward_jax, samples_per_prompt=b.eval_samples)
    train = core.make_train(algo, setup, num_iterations=cfg.iterations, sample_metrics=gold_of,
                            checkpoint_eval=(b.window, evaluate))
    hps, seed_index = core.stack_hparams(algo, values, num_seeds=1)
    keys = core.sweep_keys(seed, seed_index)
    _, hist = jax.jit(jax.vmap(train))(hps, keys)
    return {k: np.asarray(v) for k, v in hist.items() if k in ("kl", "score_raw", "gold") or k.startswith("eval/")}


def checkpoint_rows(hist: dict[str, np.ndarray], run: int) -> list[dict]:
    """``[{iteration, kl, sqrt_kl, gold, proxy, gold_se, proxy_se, kl_se}]``: the held-out evaluations of run
    ``run`` at its checkpoints (the iterations where ``eval/mask`` is 1; ``iteration`` counts updates done)."""
    its = np.flatnonzero(np.asarray(hist["eval/mask"][run]) > 0.5)
    if its.size == 0:
        raise ValueError("checkpoint_rows: the history has no held-out evaluation (eval/mask is 0 everywhere)")
    rows = []
    for it in its:
        v = {k: float(hist[f"eval/{k}"][run, it]) for k in ("kl", "gold", "proxy", "kl_se", "gold_se", "proxy_se")}
        rows.append({"iteration": int(it) + 1, "kl": v["kl"], "sqrt_kl": math.sqrt(max(v["kl"], 0.0)),
                     "gold": v["gold"], "proxy": v["proxy"],
                     **{k: v[k] for k in ("kl_se", "gold_se", "proxy_se")}})
    return rows


def windowed(hist: dict[str, np.ndarray], run: int, window: int) -> list[dict]:
    """``[{iteration, kl, sqrt_kl, gold, proxy}]``: means over consecutive windows of iterations."""
    n = hist["kl"].shape[1]
    rows = []
    for start in range(0, n - window + 1, window):
        sl = slice(start, start + window)
        kl = float(np.mean(hist["kl"][run, sl]))
        rows.append({"iteration": start + window, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),
                     "gold": float(np.mean(hist["gold"][run, sl])), "proxy": float(np.mean(hist["score_raw"][run, sl]))})
    return rows


def _end(rows: list[dict]) -> dict:
    last = rows[-1]
    return {"gold": last["gold"], "proxy": last["proxy"], "kl": last["kl"]}


def _targets(results: dict, b: Budget) -> dict:
    """The research targets (the fourth on both RM axes: labels and size), computed from the results (not tuned)."""
    low = results["rl"][_beta_key(min(b.betas))]
    golds = [r["gold"] for r in low]
    proxies = [r["proxy"] for r in low]
    third = max(2, len(low) // 3)
    proxy_slope = float(np.polyfit(np.arange(third), proxies[-third:], 1)[0]) if len(low) >= 2 else 0.0
    drop = max(golds) - golds[-1]
    ens = results["ensembles"]
    robust = max(ens["wco"]["gold"], ens["uwo"]["gold"])
    scaling = results["rm_scaling"]
    counts = sorted(int(k.split("_")[1]) for k in scaling if k.startswith("labels_"))
    peaks = [scaling[f"labels_{c}"]["peak"] for c in counts]   # the fitted best-of-N peak (None: no peak)
    sizes = sorted((k for k in scaling if k.startswith("size_")), key=lambda k: scaling[k]["num_params"])
    size_peaks = [scaling[k]["peak"] for k in sizes]

    def later(p):  # the largest RM's (or most labels') fitted peak at a larger d than the smallest's
        return bool(len(p) >= 2 and None not in (p[0], p[-1]) and p[-1] > p[0])

    return {
        "low_beta_overoptimises": {"proxy_slope_last_third": proxy_slope, "gold_peak": max(golds),
                                   "gold_end": golds[-1], "gold_drop": drop,
                                   "met": bool(proxy_slope > 0 and drop >= 0.05)},
        "bon_fit_r2": {"r2": results["fits"]["bon"]["r2"], "met": bool(results["fits"]["bon"]["r2"] >= 0.9)},
        "robust_ensemble_gold": {"single": ens["single"]["gold"], "wco": ens["wco"]["gold"], "uwo": ens["uwo"]["gold"],
                                 "met": bool(robust >= ens["single"]["gold"])},
        "peak_later_with_more_labels": {"label_counts": counts, "fitted_peak_sqrt_kl": peaks, "met": later(peaks)},
        "peak_later_with_larger_rm": {"rm_sizes": [k.split("_", 1)[1] for k in sizes],
                                      "num_params": [scaling[k]["num_params"] for k in sizes],
                                      "fitted_peak_sqrt_kl": size_peaks, "met": later(size_peaks)},
    }


def _beta_key(beta: float) -> str:
    return f"{beta:g}"


def run_lab(task_name: str, out: Path, *, budget: str = "small", seed: int = 0, log=print) -> dict[str, Any]:
    """Every stage of the lab into ``out``; returns the results dict (also written as results.json)."""
    if task_name not in list_tasks():
        raise ConfigError(f"--task: unknown task {task_name!r}; choose from {list_tasks()}")
    if budget not in BUDGETS:
        raise ConfigError(f"--budget: expected one of {sorted(BUDGETS)}, got {budget!r}")
    if seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty directory; choose a new one")
    b = BUDGETS[budget]
    task = get_task(task_name)
    t0, c0 = time.time(), time.process_time()
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def stage(name):
        seconds[name] = round(time.time() - t0 - sum(seconds.values()), 1)
        cpu[name] = max(0.0, round(time.process_time() - c0 - sum(cpu.values()), 1))
        log(f"[overopt] {name} done ({seconds[name]} s wall, {cpu[name]} s CPU)")

    sft = _sft(task_name, out, seed, b)
    sft_dir = sft.export_dir
    stage("sft")
    from_sft = ModelSection(path=sft_dir)
    ens = _reward(task_name, out, "reward_ensemble", seed, b, from_sft, labels=b.num_labels, size=b.ensemble_size)
    scaling_runs = {f"labels_{c}": _reward(task_name, out, f"reward_labels_{c}", seed + 1, b, from_sft, labels=c)
                    for c in b.label_counts}
    for name in b.rm_sizes:
        scaling_runs[f"size_{name}"] = _reward(task_name, out, f"reward_size_{name}", seed + 2, b,
                                               ModelSection(name="task", **RM_SIZES[name]), labels=max(b.label_counts))
    stage("reward_models")

    # best-of-N from the SFT policy, scored by gold, the single RM (member 0) and every scaling RM
    pm, pp = models.from_pretrained(sft_dir)
    rm, rstack, rshift = load_reward_ensemble(ens.export_dir)
    proxies = {"single": (rm, jax.tree_util.tree_map(lambda x: x[0], rstack), float(rshift[0]))}
    num_params = {}
    for key, res in scaling_runs.items():
        m, p = models.from_pretrained(res.export_dir, head="scalar")
        proxies[key] = (m, p, load_reward_shift(res.export_dir))
        num_params[key] = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p)))
    scores = _bon_scores(task, pm, pp, proxies, b, seed)
    ns = [2 ** i for i in range(int(math.log2(b.bon_n)) + 1)]
    bon_rows = bon_curve(scores, "single", ns)
    stage("best_of_n")

    # RL: PPO against the single RM (member 0's directory), every β in one vmapped program; the curve points
    # are held-out evaluations of the policy every `window` iterations on the best-of-N test prompts
    eval_prompts = encode_prompts(task, [r["prompt"] for r in task.prompt_records("test", num=b.bon_prompts)])
    single_dir = str(Path(ens.export_dir) / "member_0")
    rl_cfg = _ppo_config(task_name, seed, b, sft_dir, single_dir)
    hist = _rl_runs(rl_cfg, task, {"kl_coef": list(b.betas)}, seed, eval_prompts, b)
    rl = {_beta_key(beta): checkpoint_rows(hist, i) for i, beta in enumerate(b.betas)}
    rl_train = {_beta_key(beta): windowed(hist, i, b.window) for i, beta in enumerate(b.betas)}
    stage("rl")

    # ensembles at the smallest β: mean and uwo in one program (uwo with λ = 0 is the mean), then wco
    low = min(b.betas)
    h_uwo = _rl_runs(_ppo_config(task_name, seed, b, sft_dir, ens.export_dir, "uwo"), task,
                     {"kl_coef": [low], "uwo_lambda": [0.0, b.uwo_lambda]}, seed, eval_prompts, b)
    h_wco = _rl_runs(_ppo_config(task_name, seed, b, sft_dir, ens.export_dir, "wco"), task, {"kl_coef": [low]}, seed,
                     eval_prompts, b)
    ens_curves = {"single": rl[_beta_key(low)], "mean": checkpoint_rows(h_uwo, 0),
                  "uwo": checkpoint_rows(h_uwo, 1), "wco": checkpoint_rows(h_wco, 0)}
    stage("ensembles")

    # fits on Δgold = gold(d) − gold(0)
    g0 = bon_rows[0]["gold"]
    fits = {"bon": fit_gao([r["sqrt_kl"] for r in bon_rows], [r["gold"] - g0 for r in bon_rows], "bon")}
    rl_points = rl[_beta_key(low)]
    fits["rl"] = fit_gao([0.0] + [r["sqrt_kl"] for r in rl_points], [0.0] + [r["gold"] - g0 for r in rl_points], "rl")
    fits["rl_per_beta"] = {k: fit_gao([0.0] + [r["sqrt_kl"] for r in v], [0.0] + [r["gold"] - g0 for r in v], "rl")
                           for k, v in rl.items()}
    rm_scaling = {}
    for key, res in scaling_runs.items():
        curve = bon_curve(scores, key, ns)
        f = fit_gao([r["sqrt_kl"] for r in curve], [r["gold"] - curve[0]["gold"] for r in curve], "bon")
        best = max(curve, key=lambda r: r["gold"])
        rm_scaling[key] = {"peak": f["peak_d"], "fit": f, "observed_peak_sqrt_kl": best["sqrt_kl"],
                           "observed_peak_gold": best["gold"], "heldout_accuracy": res.eval_metrics.get("accuracy"),
                           "num_params": num_params[key],
                           "num_labels": max(b.label_counts) if key.startswith("size_") else int(key.split("_")[1]),
                           "init": "scratch" if key.startswith("size_") else "sft", "curve": curve}
    results = {
        "task": task_name, "seed": seed, "budget": budget, "budget_settings": dataclasses.asdict(b),
        "bon": bon_rows, "rl": rl, "rl_train_window": rl_train, "fits": fits,
        "rl_eval": {"prompts": b.bon_prompts, "samples_per_prompt": b.eval_samples, "every": b.window,
                    "temperature": rl_cfg.ppo.hparams.temperature, "split": "test"},
        "ensembles": {k: _end(v) for k, v in ens_curves.items()}, "ensemble_curves": ens_curves,
        "rm_scaling": rm_scaling,
        "reward_models": {"ensemble_heldout_accuracy": ens.eval_metrics.get("accuracy"),
                          "ensemble_shifts": [float(x) for x in np.asarray(rshift)]},
        "sft_gold": g0,
    }
    results["targets"] = _targets(results, b)
    stage("fits")
    results["seconds"] = {**seconds, "total": round(time.time() - t0, 1)}
    results["cpu_seconds"] = {**cpu, "total": round(time.process_time() - c0, 1)}  # all threads of this process
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_results(results, out)
    write_report(results, out / "report.md")
    log(f"[overopt] wrote {out / 'results.json'}, report.md and plots ({results['seconds']['total']} s)")
    return results


# ------------------------------------------------------------------------------------------ report and plots

def plot_results(results: dict, out: Path) -> list[str]:
    """``overopt_curves.png`` (gold and proxy vs sqrt(KL): best-of-N beside RL per β), ``ensembles.png``
    (gold and proxy vs sqrt(KL): single RM vs mean/wco/uwo) and ``rm_scaling.png`` (best-of-N gold per
    label count)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("gold", "proxy")):
        ax.plot([r["sqrt_kl"] for r in results["bon"]], [r[key] for r in results["bon"]], "k-o", label="best-of-N")
        for beta, rows in results["rl"].items():
            ax.plot([r["sqrt_kl"] for r in rows], [r[key] for r in rows], "-", marker=".", label=f"PPO β={beta}")
        ax.set_xlabel("sqrt(KL) (nats^0.5)")
        ax.set_ylabel(f"{key} reward")
        ax.set_title(f"{key} reward vs sqrt(KL)")
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out / "overopt_curves.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("gold", "proxy")):
        for name, rows in results["ensemble_curves"].items():
            ax.plot([r["sqrt_kl"] for r in rows], [r[key] for r in rows], "-", marker=".", label=name)
        ax.set_xlabel("sqrt(KL)")
        ax.set_ylabel(f"{key} reward")
        ax.set_title(f"ensembles vs single RM: {key}")
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out / "ensembles.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix, title in zip(axes, ("labels_", "size_"), ("label count (init: SFT)", "RM size (from scratch)")):
        for name, v in results["rm_scaling"].items():
            if name.startswith(prefix):
                ax.plot([r["sqrt_kl"] for r in v["curve"]], [r["gold"] for r in v["curve"]], "-o", ms=3,
                        label=f"{name} ({v['num_params']:,} params)" if prefix == "size_" else name)
        ax.set_xlabel("sqrt(KL) of best-of-N")
        ax.set_ylabel("gold reward")
        ax.set_title(f"best-of-N gold per reward model: {title}")
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out / "rm_scaling.png"))
    return paths


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _f(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(results: dict, path: Path) -> str:
    """``report.md``: the command, the fits, the ensemble table, the RM-scaling peaks and the targets."""
    t = results["targets"]
    lines = [f"# Over-optimisation lab: task `{results['task']}`, budget `{results['budget']}`, seed {results['seed']}",
             "", f"Command: `rlhf-jax overopt --task {results['task']} --budget {results['budget']} "
             f"--seed {results['seed']} --out DIR`  ({results['seconds']['total']} s wall, "
             f"{results['cpu_seconds']['total']} s CPU)", "",
             f"SFT policy gold (best-of-1): {_f(results['sft_gold'])}", "",
             "## Fits (Δgold = gold − SFT gold vs d = sqrt(KL))", "",
             "| curve | form | alpha | beta | R² | fitted peak d | fitted peak Δgold |", "|---|---|---|---|---|---|---|"]
    for name, form in (("bon", "d(α − β d)"), ("rl", "d(α − β log d)")):
        f = results["fits"][name]
        lines.append(f"| {name} | {form} | {_f(f['alpha'])} | {_f(f['beta'])} | {_f(f['r2'])} | {_f(f['peak_d'])} "
                     f"| {_f(f['peak_reward'])} |")
    lines += ["", "## Best-of-N (single RM)", "", "| N | KL | gold | proxy |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {_f(r['kl'])} | {_f(r['gold'])} | {_f(r['proxy'])} |" for r in results["bon"]]
    ev = results["rl_eval"]
    lines += ["", "## RL (PPO, fixed β, against the single RM): end of training", "",
              f"Held-out checkpoint evaluations inside the vmapped program: every {ev['every']} iterations, "
              f"{ev['prompts']} test prompts × {ev['samples_per_prompt']} samples at temperature {ev['temperature']:g}; "
              "± is one standard error over prompts.", "",
              "| β | KL | gold | proxy | max gold along the run |", "|---|---|---|---|---|"]
    for beta, rows in results["rl"].items():
        lines.append(f"| {beta} | {_f(rows[-1]['kl'])} | {_f(rows[-1]['gold'])} ± {_f(rows[-1]['gold_se'])} | "
                     f"{_f(rows[-1]['proxy'])} | {_f(max(r['gold'] for r in rows))} |")
    lines += ["", "## Ensembles (smallest β, end of training)", "", "| reward | gold | proxy (optimised) | KL |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {_f(v['gold'])} | {_f(v['proxy'])} | {_f(v['kl'])} |" for k, v in results["ensembles"].items()]
    lines += ["", "## Reward-model scaling (label counts from the SFT policy; sizes from scratch; best-of-N)", "",
              "| RM | init | labels | params | held-out accuracy | fitted peak d | observed peak d | observed peak gold |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in results["rm_scaling"].items():
        lines.append(f"| {k} | {v['init']} | {v['num_labels']} | {v['num_params']:,} | {_f(v['heldout_accuracy'])} | "
                     f"{_f(v['peak'])} | {_f(v['observed_peak_sqrt_kl'])} | {_f(v['observed_peak_gold'])} |")
    lines += ["", "## Research targets", ""]
    for k, v in t.items():
        def fmt(x):
            if isinstance(x, list):
                return "[" + ", ".join(fmt(y) for y in x) + "]"
            return _f(x) if isinstance(x, float) else str(x)
        detail = ", ".join(f"{a}={fmt(x)}" for a, x in v.items() if a != "met")
        lines.append(f"- {k}: **{'met' if v['met'] else 'NOT met'}** ({detail})")
    lines += ["", "Plots: overopt_curves.png, ensembles.png, rm_scaling.png.", ""]
    Path(path).write_text("\n".join(lines))
    return str(path)


# ------------------------------------------------------------------------------------------ command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="sentiment", help="embedded gold-reward task (default: sentiment)")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS),
                        help="tiny (tests), small (<= 5 min) or full (<= 30 min) on 2 CPU cores")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    run_lab(args.task, Path(args.out), budget=args.budget, seed=args.seed,
            log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


__all__ = ["Budget", "BUDGETS", "RM_SIZES", "fit_gao", "bon_curve", "windowed", "checkpoint_rows", "run_lab",
           "plot_results", "write_report", "add_arguments", "run"]
