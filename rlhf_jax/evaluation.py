"""Evaluation and plots shared by the pipeline and the sweeps.

Held-out evaluation of a policy (gold reward, proxy reward, ``KL(π‖π_ref)``) and of a reward
model (accuracy against the simulated labeller and the noiseless gold order) on an embedded task;
metrics files and JSONL records; PNG plots (matplotlib, Agg backend, imported only when a plot is
drawn): the pipeline's training curves and reward-vs-KL curve, a results table's series and a
vmapped sweep's per-iteration curves.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generation import generate
from rlhf_jax.rl.experience import policy_forward, reward_model_scores, rollout_forwards, sample, score_tokens
from rlhf_jax.training.metrics import read_jsonl


# ------------------------------------------------------------------------------------------ policy

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


def heldout_eval_fn(prompt_ids, prompt_mask, *, gold_fn, samples_per_prompt: int = 1, chunk: int = 0):
    """``fn(state, frozen, cfg, key) -> dict``: the held-out evaluation of an RL run's policy INSIDE its
    compiled program (``rl.core.make_train(checkpoint_eval=(every, fn))``), traceable and vmappable.

    Every prompt of ``prompt_ids/prompt_mask`` ``[P, L]`` (left-padded) is repeated ``samples_per_prompt``
    times; responses are sampled from ``state.policy`` with the algorithm's own sampling settings
    (``cfg``: its temperature, top-k/top-p and stop ids, i.e. what PPO samples with). Returns float32 scalars,
    means over the sequences: ``kl`` — per sequence ``Σ_t log π(y_t|·) − log π_ref(y_t|·)`` on the sampled
    tokens (k1, both at the sampling temperature: the estimator of :func:`evaluate_policy`), ``proxy`` — the
    run's own reward of the samples (reward model plus its shift, or the ensemble aggregated as the run
    optimises it; no missing-EOS penalty), ``gold`` — ``gold_fn(prompt_ids, prompt_mask, response_ids,
    response_mask) -> [B]``; ``kl_se``/``proxy_se``/``gold_se`` — standard errors over the prompts (each
    prompt's mean over its samples; 0 with one prompt); ``response_length``. The forwards run in chunks of
    ``chunk`` rows (0: all rows at once).
    """
    ids = jnp.asarray(np.repeat(np.asarray(prompt_ids), samples_per_prompt, axis=0))
    mask = jnp.asarray(np.repeat(np.asarray(prompt_mask), samples_per_prompt, axis=0))
    num_prompts, rows = int(np.asarray(prompt_ids).shape[0]), int(ids.shape[0])
    if samples_per_prompt < 1 or num_prompts < 1:
        raise ValueError(f"heldout_eval_fn: need >= 1 prompt and samples_per_prompt >= 1, got {num_prompts} and "
                         f"{samples_per_prompt}")
    chunk = chunk or rows
    if rows % chunk:
        raise ValueError(f"heldout_eval_fn: {rows} rows ({num_prompts} prompts x {samples_per_prompt}) are not "
                         f"divisible by chunk={chunk}")

    def fn(state, frozen, cfg, key):
        gen = sample(frozen.policy_model, state.policy.params, ids, mask, key, cfg=cfg)
        tokens, tmask = gen.tokens, gen.mask.astype(mask.dtype)
        roll = rollout_forwards(state.policy.params, None, frozen, ids, mask, tokens, tmask, chunk=chunk,
                                temperature=cfg.hparams.temperature, value_mode=None, with_ref=True)
        per_seq = {"kl": jnp.sum((roll.old_logp - roll.ref_logp) * tmask, axis=1),
                   "proxy": score_tokens(frozen, ids, mask, tokens, tmask, chunk=chunk, cfg=cfg),
                   "gold": jnp.asarray(gold_fn(ids, mask, tokens, tmask), jnp.float32)}
        out = {"response_length": jnp.mean(jnp.sum(tmask, axis=1).astype(jnp.float32))}
        for k, v in per_seq.items():
            per_prompt = v.reshape(num_prompts, samples_per_prompt).mean(axis=1)
            out[k] = jnp.mean(v)
            out[f"{k}_se"] = (jnp.std(per_prompt, ddof=1) / np.sqrt(num_prompts) if num_prompts > 1
                              else jnp.zeros((), jnp.float32))
        return out

    return fn


# ------------------------------------------------------------------------------------------ reward model

@functools.partial(jax.jit, static_argnames=("reward_model",))
def _score_batch(reward_params, p_ids, p_mask, r_ids, r_mask, *, reward_model):
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


# ------------------------------------------------------------------------------------------ records

def read_metrics(path: str | os.PathLike | None) -> list[dict]:
    """The records of a trainer's metrics JSONL file; ``[]`` when there is none."""
    return read_jsonl(path) if path and os.path.isfile(path) else []


def write_jsonl(path: str | Path, records: Iterable[dict]) -> str:
    """Writes ``records`` one JSON object per line (a data file a sweep point can point at)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str | Path) -> None:
    """Lays out ``fig``, saves it as PNG at ``path`` (creating its directory) and closes it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(path: str, sft_metrics: list[dict], reward_metrics: list[dict],
                         ppo_metrics: list[dict]) -> str:
    """Training curves (one panel per quantity) as a PNG (matplotlib, Agg backend)."""
    plt = _pyplot()
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
    _save(plt, fig, path)
    return path


def plot_reward_vs_kl(path: str, curve: list[dict], sft_eval: dict, kl_target: float | None) -> str:
    """Gold and proxy reward of held-out samples vs KL(π‖π_SFT) along PPO (Gao et al. 2022)."""
    plt = _pyplot()
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
    _save(plt, fig, path)
    return path


def plot_series(rows: Sequence[dict], *, x: str, y: str | Sequence[str], path: str | Path,
                group: str | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
                logx: bool = False, start: dict | None = None, annotate: str | None = None) -> str:
    """A line plot of results-table rows saved as PNG: ``y`` (one or several columns) against ``x``,
    one line per distinct value of ``group`` (rows sorted by ``x``). ``start``: a row drawn as a
    black star (e.g. the SFT policy at KL 0). ``annotate``: a column written next to each point."""
    plt = _pyplot()
    ys = [y] if isinstance(y, str) else list(y)
    for col in [x, *ys] + ([group] if group else []):
        if not any(col in r for r in rows):
            raise KeyError(f"plot_series: no row has column {col!r}; columns: {sorted({k for r in rows for k in r})}")
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get(group) if group else None, []).append(r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = ["o-", "s--", "^-.", "d:"]
    for gi, (g, rs) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0]))):
        rs = sorted(rs, key=lambda r: r[x])
        for yi, col in enumerate(ys):
            label = " ".join(p for p in ((col if len(ys) > 1 else ""), (f"{group}={g}" if group else "")) if p)
            ax.plot([r[x] for r in rs], [r[col] for r in rs], styles[yi % len(styles)], label=label or col,
                    color=f"C{gi if group else yi}" if group else f"C{yi}", alpha=0.9 if yi == 0 else 0.7)
            if annotate:
                for r in rs:
                    ax.annotate(f"{r[annotate]:g}" if isinstance(r[annotate], float) else str(r[annotate]),
                                (r[x], r[col]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    if start is not None:
        for yi, col in enumerate(ys):
            ax.plot([start[x]], [start[col]], "*", color=f"C{yi}" if not group else "k", markeredgecolor="k",
                    markersize=13, label=f"start: {col}" if len(ys) > 1 else "start")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or (ys[0] if len(ys) == 1 else "value"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return str(Path(path))


def plot_curves(result: Any, metric: str, path: str | Path, *, label: str | None = None,
                title: str = "") -> str:
    """Per-iteration ``metric`` of every run of a vmapped sweep (one line per run) as PNG; runs
    that share the varied values share a colour (seeds are the spread). ``result``: a
    :class:`rlhf_jax.sweeps.VmapSweepResult` (read: ``history``, ``values``, ``num_runs``)."""
    plt = _pyplot()
    if metric not in result.history:
        raise KeyError(f"plot_curves: no metric {metric!r}; have {sorted(result.history)}")
    names = list(result.values)
    label = label or (names[0] if names else None)
    keys = [tuple(result.values[n][i] for n in names) for i in range(result.num_runs)]
    colours = {k: f"C{j}" for j, k in enumerate(dict.fromkeys(keys))}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seen = set()
    for i, k in enumerate(keys):
        lab = ", ".join(f"{n}={v:g}" for n, v in zip(names, k)) if k not in seen else None
        seen.add(k)
        h = result.history[metric][i]
        ax.plot(range(1, len(h) + 1), h, color=colours[k], label=lab, alpha=0.85)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per iteration ({result.num_runs} runs, one program)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return str(Path(path))
