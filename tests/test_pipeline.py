"""The SFT → reward model → PPO pipeline: a shortened end-to-end run per task (slow), plus the
evaluation helpers and the CLI/config plumbing (fast)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluation as E
from rlhf_jax import pipeline as P
from rlhf_jax.config import ConfigError, apply_overrides
from rlhf_jax.tasks import get_task, list_tasks

SHORT = [
    "sft.steps=30", "sft.eval_every=0", "sft.log.tensorboard=true",
    "reward.steps=30", "reward.eval_every=0",
    "ppo.iterations=8", "ppo.ppo.batch_size=32", "ppo.ppo.minibatches=2", "ppo.ppo.lr=1e-3",
    "ppo.sample_every=0", "ppo.checkpoint.async_save=false",
    "eval.num_prompts=48", "eval.batch_size=16", "eval.num_pairs=64", "eval.curve_points=2",
    "eval.num_samples=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("task_name", list_tasks())
def test_short_pipeline_end_to_end(task_name, tmp_path):
    out = tmp_path / "run"
    cfg = apply_overrides(P.PipelineConfig(), SHORT + [f"task={task_name}", f"out_dir={out}", "seed=3"])
    summary = P.run_pipeline(cfg)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for section, keys in {"sft": ("gold_reward", "proxy_reward", "kl"),
                          "reward_model": ("heldout_accuracy", "gold_accuracy"),
                          "ppo": ("gold_reward", "proxy_reward", "kl", "kl_target")}.items():
        for key in keys:
            assert isinstance(on_disk[section][key], float), (section, key)
    assert isinstance(on_disk["wall_seconds"], float) and on_disk["wall_seconds"] > 0
    assert on_disk["task"] == task_name and on_disk["seed"] == 3
    for key in ("gold_reward",):
        assert 0.0 <= on_disk["sft"][key] <= 1.0 and 0.0 <= on_disk["ppo"][key] <= 1.0
    assert 0.0 <= on_disk["reward_model"]["gold_accuracy"] <= 1.0
    # the reference is the SFT policy itself: its KL is exactly 0
    assert on_disk["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)
    # PPO optimised the learned reward on held-out prompts
    assert on_disk["ppo"]["proxy_reward"] > on_disk["sft"]["proxy_reward"] + 2 * on_disk["ppo"]["proxy_reward_se"]
    assert on_disk["ppo"]["kl"] > 0
    # the curve: the intermediate checkpoint (iteration 4) and the final policy
    assert [p["iteration"] for p in on_disk["curve"]] == [4, 8]
    assert on_disk["curve"][-1]["gold_reward"] == on_disk["ppo"]["gold_reward"]
    for name in ("summary.md", "training_curves.png", "reward_vs_kl.png", "pipeline_config.json",
                 "sft/metrics.jsonl", "reward/metrics.jsonl", "ppo/metrics.jsonl",
                 "sft/export/config.json", "reward/export/model.safetensors", "ppo/export/config.json"):
        assert (out / name).is_file(), name
    assert list((out / "sft" / "tb").iterdir()), "no TensorBoard event file"
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "summary.md").read_text()
    assert "gold reward" in md and task_name in md
    # a second run into the same directory is refused before anything trains
    with pytest.raises(ConfigError, match="not empty"):
        P.run_pipeline(cfg)


def test_encode_prompts_and_responses_match_the_tokenizer():
    from transformers import AutoTokenizer

    task = get_task("sentiment")
    tok = AutoTokenizer.from_pretrained(task.tokenizer_dir)
    recs = task.sft_records("test", num=4)
    ids, mask = E.encode_prompts(task, [r["prompt"] for r in recs])
    r_ids, r_mask = E.encode_responses(task, [r["completion"] for r in recs])
    for i, r in enumerate(recs):
        assert ids[i][mask[i] == 1].tolist() == tok(r["prompt"])["input_ids"]
        assert mask[i, -1] == 1  # left padded
        assert r_ids[i][r_mask[i] == 1].tolist() == tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        assert r_mask[i, 0] == 1  # right padded
    with pytest.raises(ValueError, match="tokens"):
        E.encode_prompts(task, ["review movie plot : " + "great " * 10])


def _tiny_models(task, seed=0):
    from rlhf_jax import models

    cfg = task.model_config(hidden_size=32, num_layers=1, intermediate_size=64)
    lm, sm = models.CausalLM(cfg), models.ScalarHeadModel(cfg)
    return lm, models.init_params(lm, jax.random.PRNGKey(seed)), sm, models.init_params(sm, jax.random.PRNGKey(seed + 1))


def test_evaluate_policy_numbers_agree_with_recomputation():
    from rlhf_jax.generation import generate
    from rlhf_jax.rl.experience import policy_forward

    task = get_task("sort")
    lm, params, sm, rparams = _tiny_models(task)
    _, ref = _tiny_models(task, seed=5)[:2]
    prompts = [r["prompt"] for r in task.prompt_records("test", num=12)]
    res = E.evaluate_policy(task, lm, params, ref, sm, rparams, prompts=prompts, seed=0, batch_size=8,
                            num_samples=3)
    # 12 prompts in batches of 8: padded rows are dropped, and the first batch's draws are
    # reproducible from the same key
    ids, mask = E.encode_prompts(task, prompts)
    out = generate(lm, params, jnp.asarray(ids[:8]), jnp.asarray(mask[:8]), rng=jax.random.fold_in(jax.random.PRNGKey(0), 0),
                   max_new_tokens=task.response_length, stop_token_ids=(task.eos_id,), pad_token_id=task.pad_id,
                   prompt_buckets=(ids.shape[1],))
    gold = np.asarray(task.gold_reward_jax(ids[:8], mask[:8], out.tokens, out.mask))
    for i in range(3):
        assert res["samples"][i]["response"] == task.decode(np.asarray(out.tokens[i]))
        assert res["samples"][i]["gold"] == pytest.approx(float(gold[i]), abs=1e-6)
        text_gold = task.gold_reward_text(prompts[i], res["samples"][i]["response"],
                                          finished=bool(np.asarray(out.stopped)[i]))
        assert res["samples"][i]["gold"] == pytest.approx(text_gold, abs=1e-6)
    # KL: the policy's sampling log-probs minus the reference's forward log-probs
    ref_logp = policy_forward(lm, ref, jnp.asarray(ids[:8]), jnp.asarray(mask[:8]), out.tokens, out.mask, 1.0,
                              with_entropy=False)["logp"]
    kl8 = np.asarray(jnp.sum((out.logprobs - ref_logp) * out.mask, -1))
    assert res["num_prompts"] == 12 and res["kl"] != 0.0
    assert 0 <= res["gold_reward"] <= 1 and 0 <= res["stop_fraction"] <= 1
    # the same params as reference: KL exactly zero
    same = E.evaluate_policy(task, lm, params, params, sm, rparams, prompts=prompts[:8], seed=0, batch_size=8)
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)
    assert same["gold_reward"] == pytest.approx(float(gold.mean()), abs=1e-6)
    assert float(np.mean(kl8)) == pytest.approx(
        E.evaluate_policy(task, lm, params, ref, sm, rparams, prompts=prompts[:8], seed=0, batch_size=8)["kl"],
        abs=1e-4)


def test_evaluate_reward_model_accuracies():
    task = get_task("sentiment")
    _, _, sm, rparams = _tiny_models(task)
    res = E.evaluate_reward_model(task, sm, rparams, noise=0.1, num_pairs=64)
    recs = task.preference_records("test", 0.1, num=64)
    gold = task.preference_records("test", 0.0, num=64)
    s_c = E.score_responses(task, sm, rparams, [r["prompt"] for r in recs], [r["chosen"] for r in recs])
    s_r = E.score_responses(task, sm, rparams, [r["prompt"] for r in recs], [r["rejected"] for r in recs])
    assert res["heldout_accuracy"] == pytest.approx(float(np.mean(s_c > s_r)))
    g_c = E.score_responses(task, sm, rparams, [r["prompt"] for r in gold], [r["chosen"] for r in gold])
    g_r = E.score_responses(task, sm, rparams, [r["prompt"] for r in gold], [r["rejected"] for r in gold])
    assert res["gold_accuracy"] == pytest.approx(float(np.mean(g_c > g_r)))
    assert res["labeller_gold_agreement"] == pytest.approx(
        float(np.mean([a["chosen"] == b["chosen"] for a, b in zip(recs, gold)])))
    # scores do not depend on the batch they are computed in
    one = E.score_responses(task, sm, rparams, [recs[5]["prompt"]], [recs[5]["chosen"]])
    assert one[0] == pytest.approx(s_c[5], abs=1e-5)


def test_config_overrides_and_cli_flags(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(["--task", "sort", "--seed", "4", "--out", str(tmp_path / "x"),
                              "ppo.ppo.kl_target=3", "sft.steps=7"])
    cfg = P.config_from_args(args)
    assert (cfg.task, cfg.seed, cfg.out_dir) == ("sort", 4, str(tmp_path / "x"))
    assert cfg.ppo.ppo.kl_target == 3.0 and cfg.sft.steps == 7
    sft, rm, ppo = P.stage_configs(cfg, sft_export="/s", reward_export="/r")
    assert (sft.task, rm.task, ppo.task) == ("sort", "sort", "sort")
    assert (sft.seed, rm.seed, ppo.seed) == (4, 4, 4)
    assert sft.out_dir.endswith("x/sft") and rm.out_dir.endswith("x/reward") and ppo.out_dir.endswith("x/ppo")
    assert rm.model.path == "/s" and ppo.policy.path == "/s" and ppo.reward.path == "/r"
    assert ppo.reward.kind == "model" and ppo.ppo.max_new_tokens == get_task("sort").response_length
    lo = P.config_from_args(parser.parse_args(["--lora-rank", "8"]))
    assert lo.ppo.policy.lora_rank == 8 and lo.ppo.policy.lora_modules_to_save == ("embed_tokens",)
    lo = P.config_from_args(parser.parse_args(["--lora-rank", "8", "ppo.policy.lora_modules_to_save=[]"]))
    assert lo.ppo.policy.lora_modules_to_save == () and P.config_from_args(parser.parse_args([])).ppo.policy.lora_rank == 0
    with pytest.raises(ConfigError, match="sft.nope"):
        P.config_from_args(parser.parse_args(["sft.nope=1"]))
    with pytest.raises(ConfigError, match="unknown task"):
        P.config_from_args(parser.parse_args(["--task", "chess"]))
    with pytest.raises(ConfigError, match="eval.num_prompts"):
        P.config_from_args(parser.parse_args(["eval.num_prompts=0"]))


def test_non_empty_out_dir_is_refused_before_training(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    cfg = apply_overrides(P.PipelineConfig(), [f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="--overwrite to replace"):
        P.run_pipeline(cfg)
    with pytest.raises(ConfigError, match="only replaces an earlier pipeline run"):
        P.run_pipeline(apply_overrides(cfg, ["overwrite=true"]))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
