"""Every shipped experiment config parses, takes validated overrides, documents its command, and a
tiny one runs end to end through the CLI."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from rlhf_jax.config import ConfigError, apply_overrides, from_dict, load_config_file, to_dict

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))

# file-name prefix -> (config class name, rlhf-jax subcommand, a sample override, its expected value path)
KINDS = {
    "sft": ("SFTConfig", "sft", "optim.learning_rate=2e-4", ("optim", "learning_rate"), 2e-4),
    "reward": ("RewardConfig", "reward", "label_noise=0.3", ("label_noise",), 0.3),
    "ppo": ("PPOTrainConfig", "ppo", "ppo.kl_coef=0.02", ("ppo", "kl_coef"), 0.02),
    "grpo": ("GRPOTrainConfig", "grpo", "grpo.kl_coef=0.01", ("grpo", "kl_coef"), 0.01),
    "rloo": ("RLOOTrainConfig", "rloo", "rloo.kl_coef=0.01", ("rloo", "kl_coef"), 0.01),
    "dpo": ("DPOTrainConfig", "dpo", "dpo.beta=0.3", ("dpo", "beta"), 0.3),
    "online": ("OnlineDPOTrainConfig", "online_dpo", "online_dpo.beta=0.3", ("online_dpo", "beta"), 0.3),
    "rsft": ("RSFTTrainConfig", "rsft", "rsft.temperature=0.7", ("rsft", "temperature"), 0.7),
    "rlhf": ("PipelineConfig", "pipeline", "ppo.ppo.kl_coef=0.02", ("ppo", "ppo", "kl_coef"), 0.02),
    "pipeline": ("PipelineConfig", "pipeline", "ppo.ppo.kl_coef=0.02", ("ppo", "ppo", "kl_coef"), 0.02),
}


def _kind(path: Path) -> str:
    prefix = path.stem.split("_")[0]
    assert prefix in KINDS, f"{path.name}: unknown experiment kind {prefix!r} (expected one of {sorted(KINDS)})"
    return prefix


def test_the_promised_recipes_are_shipped():
    names = {p.stem for p in EXPERIMENTS}
    for kind in ("sft", "reward", "ppo", "grpo", "dpo", "rlhf"):
        assert any(n.startswith(kind + "_") and n.endswith("_tiny") for n in names), kind
        for shape in ("gpt2", "llama1b"):
            assert f"{kind}_{shape}" in names, f"{kind}_{shape}"
    assert "sft_sort_tiny" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_config_parses_and_validates_overrides(path):
    kind = _kind(path)
    cls_name, command, override, field_path, value = KINDS[kind]
    cfg = load_config_file(path)
    assert type(cfg).__name__ == cls_name
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # frozen
    # the docstring carries the command that runs this very file
    text = path.read_text()
    docstring = text.split('"""')[1]
    rel = f"experiments/{path.name}"
    assert re.search(rf"rlhf-jax {command} --config {re.escape(rel)}\b", docstring), docstring
    # a sample override lands where it should; nothing else changes
    new = apply_overrides(cfg, [override])
    got = new
    for part in field_path:
        got = getattr(got, part)
    assert got == pytest.approx(value)
    assert apply_overrides(new, [f"--config.seed={cfg.seed}"]) == apply_overrides(cfg, [override])
    # the resolved config is JSON (the run record) and rebuilds to the same config
    as_dict = json.loads(json.dumps(to_dict(cfg)))
    assert to_dict(from_dict(type(cfg), as_dict)) == as_dict
    # unknown keys and wrong types fail naming the key, before anything is built
    with pytest.raises(ConfigError, match="no_such_key"):
        apply_overrides(cfg, ["no_such_key=1"])
    section = field_path[0] if len(field_path) > 1 else "optim"
    with pytest.raises(ConfigError, match=f"{section}.no_such_key"):
        apply_overrides(cfg, [f"{section}.no_such_key=1"])
    with pytest.raises(ConfigError, match="seed"):
        apply_overrides(cfg, ["seed=not_a_number"])
    with pytest.raises(ConfigError, match=re.escape(".".join(field_path))):
        apply_overrides(cfg, [f"{'.'.join(field_path)}=[1, 2]"])


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.stem.split("_")[0] in ("sft", "reward", "ppo", "grpo",
                                                                                       "rloo", "dpo", "online", "rsft")],
                         ids=lambda p: p.stem)
def test_model_sections_point_where_the_docstring_says(path):
    """Accelerator recipes are at the promised shapes; checkpoint paths are overridable."""
    cfg = load_config_file(path)
    section = "model" if hasattr(cfg, "model") else "policy"
    model = getattr(cfg, section)
    ckpt = apply_overrides(cfg, [f"{section}.path=/ckpt/dir"])
    assert getattr(ckpt, section).path == "/ckpt/dir"
    if path.stem.startswith("sft_gpt2"):
        assert (model.arch, model.hidden_size, model.num_layers, model.num_heads, model.vocab_size) == (
            "gpt2", 768, 12, 12, 50257)
    if path.stem.startswith("sft_llama1b"):
        assert (model.arch, model.hidden_size, model.num_layers, model.num_kv_heads, model.intermediate_size) == (
            "llama", 2048, 16, 8, 8192)
        assert model.remat and model.dtype == "bfloat16"


def test_gpt2_and_llama_shapes_have_the_advertised_parameter_counts():
    import jax
    import numpy as np

    from rlhf_jax import models
    counts = {}
    for stem in ("sft_gpt2", "sft_llama1b"):
        m = load_config_file(ROOT / "experiments" / f"{stem}.py").model
        sizes = {k: v for k, v in m.size_overrides().items() if k not in ("dtype", "param_dtype", "remat")}
        mc = models.tiny_config(arch=m.arch, **sizes)
        shapes = jax.eval_shape(lambda mc=mc: models.init_params(models.CausalLM(mc), jax.random.PRNGKey(0)))
        counts[stem] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert 124e6 < counts["sft_gpt2"] < 125e6, counts      # GPT-2 small: 124.4M with tied embeddings
    assert 1.2e9 < counts["sft_llama1b"] < 1.6e9, counts   # Llama-3.2-1B: 1.24B tied, 1.50B untied


@pytest.mark.slow
def test_tiny_sft_runs_end_to_end_through_the_cli(tmp_path, capsys):
    from rlhf_jax.cli import main
    out = tmp_path / "sft"
    rc = main(["sft", "--config", "experiments/sft_sort_tiny.py", "--out", str(out), "steps=2", "eval_every=0",
               "eval_batches=1", "export=false", "data.batch_size=8", "data.max_length=16", "model.hidden_size=16",
               "model.head_dim=8", "model.intermediate_size=32", "checkpoint.async_save=false",
               "log.tensorboard=false", "log.every=1", "--config.optim.learning_rate=0.01"])
    assert rc == 0
    assert "sft: 2 steps" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["task"] == "sort" and run["config"]["optim"]["learning_rate"] == 0.01


def test_cli_rejects_bad_override_naming_the_key(capsys):
    from rlhf_jax.cli import main
    assert main(["sft", "--config", "experiments/sft_sort_tiny.py", "optim.learnin_rate=1e-3"]) == 2
    assert "optim.learnin_rate" in capsys.readouterr().err
    assert main(["ppo", "--config", "experiments/ppo_sort_tiny.py", "--config.ppo.kl_coef=high"]) == 2
    assert "ppo.kl_coef" in capsys.readouterr().err
