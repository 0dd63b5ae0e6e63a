"""Vmapped sweeps of LoRA runs hold the frozen base ONCE: only the adapters (and scalar heads), their
optimiser states, keys, prompts and hyper-parameters carry the runs axis (issue 19).

The split of a run's params by its optimiser's frozen mask; several seeds whose bases differ (stacked
per run); a LoRA PPO sweep (policy and critic adapters) equal to its runs one at a time; and the compiled
program's own memory analysis: 8 runs take about the argument bytes of 1, far below 8 bases.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.models import lora
from rlhf_jax.sweeps import run_policy_params, run_separately, run_vmapped_sweep
from rlhf_jax.sweeps.vmapped import frozen_mask, join_frozen, shared_frozen_params, split_frozen
from rlhf_jax.training.optim import OptimConfig, make_optimizer
from tests.mesh_sweep_utils import run_mesh_sweep_script

ROOT = Path(__file__).resolve().parents[1]
PPO_LORA = ROOT / "experiments" / "ppo_lora_sort_tiny.py"
GRPO_LORA = ROOT / "experiments" / "grpo_lora_sort_tiny.py"
# 2 iterations of 4 prompts x 6 tokens, two epochs of two minibatches: a small LoRA PPO program that still
# takes several optimiser steps per iteration (policy and critic adapters)
PPO_SMALL = ["iterations=2", "ppo.batch_size=4", "ppo.max_new_tokens=6", "ppo.minibatches=2", "ppo.ppo_epochs=2"]


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def test_split_and_join_by_the_optimisers_frozen_mask():
    rng = np.random.default_rng(0)
    base = {"model": {"layers_0": {"attn": {"q_proj": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)}}},
                      "embed": {"embedding": rng.normal(size=(5, 8)).astype(np.float32)}},
            "score": {"kernel": rng.normal(size=(8, 1)).astype(np.float32)}}
    params = {"params": base, "lora": lora.init_adapters({"params": base}, lora.LoraConfig(rank=2),
                                                         jax.random.PRNGKey(0))}
    tx = make_optimizer(OptimConfig(learning_rate=1.0), params, total_steps=4)
    mask = frozen_mask(tx)
    frozen, own = split_frozen(params, mask)
    # the base kernels are frozen; the adapters and the scalar head train
    assert {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(frozen)} == {
        "['params']['model']['embed']['embedding']", "['params']['model']['layers_0']['attn']['q_proj']['kernel']"}
    assert sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(own)) == [
        "['lora']['model']['layers_0']['attn']['q_proj']['a']", "['lora']['model']['layers_0']['attn']['q_proj']['b']",
        "['params']['score']['kernel']"]
    back = join_frozen(frozen, own)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        assert a is b
    assert frozen_mask(make_optimizer(OptimConfig(learning_rate=1.0), base, total_steps=4)) == ()  # full fine-tune
    with pytest.raises(ValueError, match="another model"):
        split_frozen(base, mask)


def test_several_seeds_with_a_base_drawn_from_the_seed_stack_their_bases(capsys):
    # no policy.path: each seed's base is the task model initialised from that seed -> stacked per run
    cfg = apply_overrides(load_config_file(GRPO_LORA), ["iterations=1", "grpo.batch_size=4", "grpo.max_new_tokens=4"])
    res = run_vmapped_sweep(cfg, {"grpo.kl_coef": ["0.01"]}, seeds=2)
    assert res.shared == {} and "stacked once per run" in capsys.readouterr().out
    bases = [run_policy_params(res, i)["params"]["model"]["layers_0"]["attn"]["q_proj"]["kernel"] for i in (0, 1)]
    assert float(jnp.abs(bases[0] - bases[1]).max()) > 0


@pytest.mark.slow
def test_seeds_share_the_base_loaded_from_policy_path(tmp_path):
    """Several seeds over one SFT model (``policy.path``): one base, each seed its own adapters; runs equal
    their runs one at a time; a set-up holding another base is refused."""
    from rlhf_jax import models
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.rl.trainer import build_setup
    from rlhf_jax.tasks import get_task
    from rlhf_jax.training.common import build_model
    cfg = apply_overrides(load_config_file(GRPO_LORA), ["iterations=2", "grpo.batch_size=4", "grpo.max_new_tokens=6"])
    task = get_task("sort")
    model, params, _ = build_model(dataclasses.replace(cfg.policy, lora_rank=0), task=task,
                                   tokenizer=load_tokenizer(task.tokenizer_dir), head=None, rng=jax.random.PRNGKey(5))
    models.save_pretrained(tmp_path / "sft", model, params)
    sft = apply_overrides(cfg, [f"policy.path={tmp_path / 'sft'}"])
    grid = {"grpo.kl_coef": ["0.01", "0.1"]}
    res = run_vmapped_sweep(sft, grid, seeds=2)
    assert [r["overrides"] for r in res.rows][1:3] == [["grpo.kl_coef=0.01", "seed=1"], ["grpo.kl_coef=0.1", "seed=0"]]
    for a, b in zip(jax.tree_util.tree_leaves(res.shared["policy_params"]["params"]),
                    jax.tree_util.tree_leaves(params["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the saved model, once
    separate = run_separately(sft, [({"kl_coef": res.values["kl_coef"][i]}, int(res.seed_index[i])) for i in (1, 2)],
                              setup=res.setup)
    for i, (final, hist) in zip((1, 2), separate):
        for k in ("score", "kl", "policy_loss", "entropy"):
            np.testing.assert_allclose(res.history[k][i], hist[k], rtol=1e-5, atol=1e-6, err_msg=f"run {i} {k}")
        # Adam normalises the gradient, so float reassociation in a near-zero gradient component moves an
        # adapter weight (~0.1) by up to ~lr * 1e-3: 2.7e-6 seen here
        for a, b in zip(jax.tree_util.tree_leaves(run_policy_params(res, i)),
                        jax.tree_util.tree_leaves(final.policy.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the two seeds' adapters are their own (drawn from the seed): same kl_coef, different seed
    a0, a1 = (np.asarray(run_policy_params(res, i)["lora"]["model"]["layers_0"]["attn"]["q_proj"]["a"]) for i in (0, 1))
    assert float(np.max(np.abs(a0 - a1))) > 1e-3
    with pytest.raises(ConfigError, match="differs from the one the sweep's runs share"):
        run_vmapped_sweep(sft, grid, seeds=2, setup=build_setup(cfg))  # a set-up of the seed's random base


@pytest.fixture(scope="module")
def lora_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_sweep")
    cfg = apply_overrides(load_config_file(PPO_LORA), PPO_SMALL)
    res = run_vmapped_sweep(cfg, {"ppo.kl_coef": ["0.01", "0.5"], "ppo.lr": ["3e-3", "1e-2"]}, seeds=1,
                            out_dir=out, save_policies=True)
    return cfg, res, out


@pytest.mark.slow
def test_lora_sweep_holds_the_base_once_and_equals_separate_runs(lora_sweep):
    cfg, res, _ = lora_sweep
    runs = res.num_runs
    assert runs == 4
    shared = res.shared
    assert set(shared) == {"policy_params", "value_params"}  # the policy's base and the LoRA critic's
    # the stacked final state holds no base leaf: every leaf has the runs axis and is an adapter, a scalar
    # head, an optimiser moment, a key or a counter
    policy_leaves = jax.tree_util.tree_leaves_with_path(res.final_state.policy.params)
    assert policy_leaves and all(jax.tree_util.keystr(p).startswith(("['lora']", "['params']['score']",
                                                                       "['params']['value_head']"))
                                 for p, _ in policy_leaves)
    assert all(np.shape(x)[0] == runs for x in jax.tree_util.tree_leaves(res.final_state))
    for key in shared:  # the shared part is exactly the setup's frozen base, and the base alone
        want = split_frozen(getattr(res.setup, key), frozen_mask(getattr(res.setup, key.split("_")[0] + "_tx")))[0]
        assert jax.tree_util.tree_leaves(shared[key]) and all(
            a is b for a, b in zip(jax.tree_util.tree_leaves(shared[key]), jax.tree_util.tree_leaves(want)))
        assert "lora" not in shared[key] or not jax.tree_util.tree_leaves(shared[key]["lora"])
    # each run's policy is the shared base + its own adapters, exactly the run made one at a time
    values = [({"kl_coef": k, "lr": lr}, cfg.seed) for k, lr in zip(res.values["kl_coef"], res.values["lr"])]
    separate = run_separately(cfg, values, setup=res.setup)
    for i, (final, hist) in enumerate(separate):
        for k in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "policy_grad_norm"):
            np.testing.assert_allclose(res.history[k][i], hist[k], rtol=1e-5, atol=1e-6, err_msg=f"run {i} {k}")
        got, want = run_policy_params(res, i), final.policy.params
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        value_own = jax.tree_util.tree_map(lambda x: x[i], res.final_state.value.params)
        for a, b in zip(jax.tree_util.tree_leaves(join_frozen(shared["value_params"], value_own)),
                        jax.tree_util.tree_leaves(final.value.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the runs really differ (their hyper-parameters do), from the same start
    b = [np.asarray(run_policy_params(res, i)["lora"]["model"]["layers_0"]["attn"]["q_proj"]["b"]) for i in (0, 3)]
    assert float(np.max(np.abs(b[0] - b[1]))) > 1e-6


@pytest.mark.slow
def test_saved_policies_of_a_lora_sweep_are_base_plus_each_runs_adapters(lora_sweep):
    from rlhf_jax import models
    _, res, out = lora_sweep
    exports = sorted(out.glob("*/export"))
    assert [p.parent.name[:3] for p in exports] == ["000", "001", "002", "003"]
    ids = jnp.asarray(np.arange(3, 17, dtype=np.int32).reshape(2, 7))
    for i in (0, 3):
        assert (exports[i] / "adapter" / "adapter_model.safetensors").is_file()
        m, p = models.from_pretrained(exports[i])
        np.testing.assert_allclose(m.apply(p, ids), res.setup.policy_model.apply(run_policy_params(res, i), ids),
                                   atol=1e-4)


def _compiled_sweep(cfg, runs: int) -> tuple[dict, str]:
    """The vmapped sweep of ``runs`` kl_coef values as ``rlhf-jax plan`` compiles it (one CPU device, abstract
    inputs: nothing runs): ``(memory bytes from its memory analysis, optimised HLO text)``."""
    from rlhf_jax import devices as devices_lib
    from rlhf_jax.plan import memory_bytes, trace_programs
    from rlhf_jax.training.configs import MeshConfig
    grid = {"grpo.kl_coef": [str(0.01 * (k + 1)) for k in range(runs)]}
    with devices_lib.targeting(jax.devices()[:1], abstract=True):
        _, (prog,) = trace_programs(cfg, "grpo", sweep={"grid": grid, "seeds": 1,
                                                         "mesh": MeshConfig(runs=1, data=1, fsdp=1)})
    compiled = prog.fn.lower(*prog.args, **prog.kwargs).compile()
    return memory_bytes(compiled), compiled.as_text()


@pytest.mark.slow
def test_compiled_lora_sweep_of_8_runs_takes_the_base_once():
    """The compiled program's own memory analysis (as ``rlhf-jax plan`` compiles it, one CPU device): a
    base-heavy LoRA GRPO sweep's argument bytes grow from 1 to 8 runs by the runs' adapters, states and
    prompts only, and no buffer of the program is a frozen MLP kernel with a runs axis."""
    cfg = load_config_file(GRPO_LORA)
    cfg = dataclasses.replace(cfg, iterations=2, policy=dataclasses.replace(
        cfg.policy, hidden_size=64, intermediate_size=1024, lora_rank=1, lora_targets=(r"attn/q_proj/kernel$",)),
        grpo=dataclasses.replace(cfg.grpo, batch_size=4, max_new_tokens=4))
    from rlhf_jax.rl.trainer import build_setup
    frozen = shared_frozen_params(build_setup(cfg))["policy_params"]
    base = _nbytes(frozen)
    (one, _), (eight, hlo) = _compiled_sweep(cfg, 1), _compiled_sweep(cfg, 8)
    print({"base_bytes": base, "runs1": one, "runs8": eight})
    assert one["argument_bytes"] >= base  # the base is an argument of the program (not a constant)...
    assert eight["argument_bytes"] < 2 * base  # ...held once: 8 stacked bases would be 8x
    assert eight["argument_bytes"] - one["argument_bytes"] < 0.25 * base
    mlp = {tuple(x.shape) for x in jax.tree_util.tree_leaves(frozen["params"]["model"]["layers_0"]["mlp"])}
    assert mlp == {(64, 1024), (1024, 64)}
    for shape in mlp:  # the frozen MLP kernels are in the program, never with a leading runs axis
        assert f"f32[{shape[0]},{shape[1]}]" in hlo
        assert f"f32[8,{shape[0]},{shape[1]}]" not in hlo and f"f32[{shape[0]},8,{shape[1]}]" not in hlo


# after tests/mesh_sweep_utils.PREAMBLE: the program's inputs as the sweep places them: the shared base over
# fsdp, replicated over runs; the runs' own leaves (adapters) split over runs
MESH_LORA_BODY = r"""
base_specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(shared)]
own_specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(inputs["policy_params"])]
assert base_specs and all("runs" not in s for s in base_specs), base_specs
assert any("fsdp" in s for s in base_specs), base_specs
assert own_specs and all(s and s[0] == "runs" for s in own_specs), own_specs
for k, v in one.history.items():
    np.testing.assert_allclose(res.history[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
diff = 0.0
for i in range(4):
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(run_policy_params(res, i))),
                    jax.tree_util.tree_leaves(jax.device_get(run_policy_params(one, i)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        diff = max(diff, float(np.max(np.abs(a - b))))
# run 0's whole policy (its adapters joined with the shared base, both on the mesh) in a jitted forward
assert all("runs" not in str(x.sharding.spec) for x in jax.tree_util.tree_leaves(res.shared))
ids = np.arange(3, 13, dtype=np.int32).reshape(2, 5)
fwd = lambda model: jax.jit(lambda p: model.apply(p, ids))
got = jax.tree_util.tree_leaves(fwd(res.setup.policy_model)(run_policy_params(res, 0)))
want = jax.tree_util.tree_leaves(fwd(one.setup.policy_model)(run_policy_params(one, 0)))
for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
print("RESULT", json.dumps({"params_max_abs": diff, "base_specs": sorted(set(map(str, base_specs)))}))
"""


@pytest.mark.slow
def test_lora_sweep_on_a_runs_by_fsdp_mesh_shares_the_base_and_matches_one_device(tmp_path):
    """8 fake CPU devices, mesh runs=4 x fsdp=2: the base is one fsdp-sharded argument replicated over runs;
    curves and final policies equal the one-device sweep's."""
    res = run_mesh_sweep_script(MESH_LORA_BODY, GRPO_LORA, tmp_path)
    print(res)
    assert res["params_max_abs"] <= 1e-4
