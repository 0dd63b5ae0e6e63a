"""Vmapped full-fine-tune sweeps hold the reference policy ONCE when every run has the same one (one seed,
or several seeds over one model loaded from ``policy.path``): it enters the program unbatched in the frozen
argument instead of once per run; several seeds that each draw their own model still stack it.

The decision (``rl.trainer.seeded_reference_params``); the program's inputs (no per-run reference; as many
argument bytes fewer as 7 of 8 references take); PPO and GRPO sweeps equal to the former stacked program and
to their runs one at a time; several seeds over a saved model with a bfloat16 reference
(``ref_param_dtype``); a set-up holding another reference is refused; and the ``runs=4, fsdp=2`` mesh
(8 fake CPU devices, subprocess) places the reference over ``fsdp``, replicated over ``runs``.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import devices as devices_lib
from rlhf_jax.config import ConfigError, apply_overrides, load_config_file
from rlhf_jax.rl.trainer import build_setup, seeded_reference_params
from rlhf_jax.sweeps import run_separately, run_vmapped_sweep
from rlhf_jax.sweeps.vmapped import stacked_run_inputs
from rlhf_jax.training import loop
from rlhf_jax.training.configs import MeshConfig
from tests.mesh_sweep_utils import run_mesh_sweep_script

ROOT = Path(__file__).resolve().parents[1]
PPO_TINY = ROOT / "experiments" / "ppo_sort_tiny.py"
GRPO_TINY = ROOT / "experiments" / "grpo_sort_tiny.py"
GRPO_LORA = ROOT / "experiments" / "grpo_lora_sort_tiny.py"
SMALL_MODEL = ["policy.hidden_size=16", "policy.head_dim=8", "policy.intermediate_size=32"]
# 2 iterations of 4 prompts x 6 tokens: the smallest real PPO / GRPO programs that still take several updates
PPO_SMALL = ["iterations=2", "ppo.batch_size=4", "ppo.max_new_tokens=6", "ppo.minibatches=2", "ppo.ppo_epochs=1",
             *SMALL_MODEL]
GRPO_SMALL = ["iterations=2", "grpo.batch_size=4", "grpo.max_new_tokens=6", *SMALL_MODEL]
HISTORY = ("score", "kl", "policy_loss", "entropy")


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def test_which_sweeps_share_the_reference():
    ppo = load_config_file(PPO_TINY)
    assert "policy.path" in seeded_reference_params(ppo)  # the task model initialised from each seed
    assert seeded_reference_params(apply_overrides(ppo, ["policy.path=runs/sft/export"])) == ""
    assert seeded_reference_params(load_config_file(GRPO_LORA)) == ""  # LoRA: the reference is the base


def test_stacked_run_inputs_drop_the_shared_reference_after_checking_it():
    cfg = apply_overrides(load_config_file(GRPO_TINY), GRPO_SMALL)
    setup = build_setup(cfg)
    _, one, shared = stacked_run_inputs(cfg, [cfg.seed] * 3, setup=setup)
    assert "ref_params" not in one and shared == {}  # a full fine-tune: nothing frozen in the optimiser
    _, stacked, _ = stacked_run_inputs(cfg, [cfg.seed] * 3, setup=setup, share_reference=False)
    ref = setup.frozen.ref_params
    assert jax.tree_util.tree_structure(stacked["ref_params"]) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(stacked["ref_params"]), jax.tree_util.tree_leaves(ref)):
        assert a.shape == (3, *b.shape)
        np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b))
    # a set-up whose reference is another seed's model is refused, naming the leaf
    with pytest.raises(ConfigError, match=r"reference policy's params \(leaf \['params'\].*seed 1 differ"):
        stacked_run_inputs(cfg, [1, 1], setup=setup)


def _planned_args(cfg, grid: dict, *, seeds: int = 1, share_reference: bool = True) -> tuple:
    """The vmapped sweep as ``rlhf-jax plan`` traces it (one CPU device, abstract: nothing runs):
    ``(program, its abstract placed args)``."""
    caught = []

    def go():
        try:
            run_vmapped_sweep(cfg, grid, seeds=seeds, mesh=MeshConfig(runs=1, data=1, fsdp=1),
                              share_reference=share_reference)
        except loop.Planned as p:
            caught.append(p)
    with devices_lib.targeting(jax.devices()[:1], abstract=True):
        jax.eval_shape(go)
    (prog,) = caught[0].programs
    return prog, prog.args


@pytest.mark.slow
def test_compiled_sweep_of_8_runs_takes_the_reference_once():
    """8 GRPO runs, one seed: the program takes no per-run reference, its frozen argument holds one
    unbatched reference, and its argument bytes (the compiled program's memory analysis) are 7 references
    fewer than the stacked program's."""
    from rlhf_jax.plan import memory_bytes
    cfg = load_config_file(GRPO_TINY)
    grid = {"grpo.kl_coef": [str(0.01 * (k + 1)) for k in range(8)]}
    ref = build_setup(cfg).frozen.ref_params
    out = {}
    for share in (True, False):
        prog, (hp, keys, inputs, frozen, shared) = _planned_args(cfg, grid, share_reference=share)
        if share:
            assert "ref_params" not in inputs
            assert [x.shape for x in jax.tree_util.tree_leaves(frozen.ref_params)] == [
                x.shape for x in jax.tree_util.tree_leaves(ref)]
        else:
            assert frozen.ref_params is None
            assert [x.shape for x in jax.tree_util.tree_leaves(inputs["ref_params"])] == [
                (8, *x.shape) for x in jax.tree_util.tree_leaves(ref)]
        out[share] = memory_bytes(prog.fn.lower(*prog.args, **prog.kwargs).compile())["argument_bytes"]
    print({"ref_bytes": _nbytes(ref), "shared": out[True], "stacked": out[False]})
    assert out[False] - out[True] == 7 * _nbytes(ref)


@pytest.mark.slow
def test_seeds_drawing_their_own_model_stack_the_reference(capsys):
    cfg = apply_overrides(load_config_file(GRPO_TINY), GRPO_SMALL)
    _, (_, _, inputs, frozen, _) = _planned_args(cfg, {"grpo.kl_coef": ["0.01"]}, seeds=2)
    assert frozen.ref_params is None and all(x.shape[0] == 2 for x in jax.tree_util.tree_leaves(inputs["ref_params"]))
    assert "the reference policy is stacked once per run" in capsys.readouterr().out


def _same_history(a: dict, b: dict, *, rtol: float, atol: float = 0.0, what: str = "") -> float:
    """Asserts two sweeps' histories agree; returns the largest absolute difference."""
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("config,section,overrides,grid", [
    (PPO_TINY, "ppo", PPO_SMALL, {"ppo.kl_coef": ["0.01", "0.5"]}),
    (GRPO_TINY, "grpo", GRPO_SMALL, {"grpo.kl_coef": ["0.01", "0.5"], "grpo.lr": ["1e-3", "1e-2"]}),
])
def test_shared_reference_sweep_equals_stacked_program_and_separate_runs(config, section, overrides, grid):
    cfg = apply_overrides(load_config_file(config), overrides)
    res = run_vmapped_sweep(cfg, grid, seeds=1)
    stacked = run_vmapped_sweep(cfg, grid, seeds=1, setup=res.setup, share_reference=False)
    diff = _same_history(res.history, stacked.history, rtol=1e-6, what="shared vs stacked reference")
    for a, b in zip(jax.tree_util.tree_leaves(res.final_state.policy.params),
                    jax.tree_util.tree_leaves(stacked.final_state.policy.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    print({"shared_vs_stacked_history_max_abs": diff})
    names = list(res.values)
    runs = [({n: res.values[n][i] for n in names}, int(res.seed_index[i])) for i in range(res.num_runs)]
    for i, (final, hist) in enumerate(run_separately(cfg, runs, setup=res.setup)):
        for k in HISTORY:
            np.testing.assert_allclose(res.history[k][i], hist[k], rtol=1e-5, atol=1e-6, err_msg=f"run {i} {k}")
    # the runs really differ (their hyper-parameters do) from the same start
    assert res.history["kl"].shape == (res.num_runs, 2) and np.all(np.isfinite(res.history["kl"]))
    assert not np.allclose(res.history["policy_loss"][0], res.history["policy_loss"][-1])


@pytest.mark.slow
def test_seeds_over_one_saved_model_share_a_bfloat16_reference(tmp_path, capsys):
    """Two seeds over one saved model (``policy.path``) with ``ref_param_dtype=bfloat16``: one bfloat16
    reference for both runs; equal to the stacked program and to the runs one at a time; a set-up holding
    another reference is refused."""
    from rlhf_jax import models
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.tasks import get_task
    from rlhf_jax.training.common import build_model
    cfg = apply_overrides(load_config_file(PPO_TINY), PPO_SMALL)
    task = get_task("sort")
    model, params, _ = build_model(cfg.policy, task=task, tokenizer=load_tokenizer(task.tokenizer_dir), head=None,
                                   rng=jax.random.PRNGKey(5))
    models.save_pretrained(tmp_path / "sft", model, params)
    sft = apply_overrides(cfg, [f"policy.path={tmp_path / 'sft'}", "ref_param_dtype=bfloat16"])
    grid = {"ppo.kl_coef": ["0.05"]}
    res = run_vmapped_sweep(sft, grid, seeds=2)
    assert "stacked once per run" not in capsys.readouterr().out
    ref = res.setup.frozen.ref_params
    assert {x.dtype for x in jax.tree_util.tree_leaves(ref)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree_util.tree_leaves(ref["params"]), jax.tree_util.tree_leaves(params["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))  # the saved model, cast
    stacked = run_vmapped_sweep(sft, grid, seeds=2, setup=res.setup, share_reference=False)
    _same_history(res.history, stacked.history, rtol=1e-6, what="shared vs stacked reference")
    separate = run_separately(sft, [({"kl_coef": 0.05}, int(s)) for s in res.seed_index], setup=res.setup)
    for i, (_, hist) in enumerate(separate):
        for k in HISTORY:
            np.testing.assert_allclose(res.history[k][i], hist[k], rtol=1e-5, atol=1e-6, err_msg=f"run {i} {k}")
    assert not np.allclose(res.history["kl"][0], res.history["kl"][1])  # the seeds draw their own rollouts
    with pytest.raises(ConfigError, match="reference policy's params"):
        run_vmapped_sweep(sft, grid, seeds=2, setup=build_setup(cfg))  # the set-up of the seed's random model


# after tests/mesh_sweep_utils.PREAMBLE
MESH_BODY = r"""
assert "ref_params" not in inputs
ref_specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(frozen.ref_params)]
own_specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(inputs["policy_params"])]
assert ref_specs and all("runs" not in s for s in ref_specs), ref_specs
assert any("fsdp" in s for s in ref_specs), ref_specs
assert own_specs and all(s and s[0] == "runs" for s in own_specs), own_specs
stacked = run_vmapped_sweep(cfg, grid, seeds=1, setup=setup, mesh=mesh, share_reference=False)
diff = {}
for name, other, rtol in (("mesh_vs_one_device", one, 1e-5), ("shared_vs_stacked_on_mesh", stacked, 1e-6)):
    for k, v in other.history.items():
        np.testing.assert_allclose(res.history[k], v, rtol=rtol, atol=1e-6, err_msg=name + " " + k)
    diff[name] = max(float(np.max(np.abs(res.history[k] - v))) for k, v in other.history.items())
print("RESULT", json.dumps(diff))
"""


@pytest.mark.slow
def test_shared_reference_on_a_runs_by_fsdp_mesh(tmp_path):
    """8 fake CPU devices, mesh runs=4 x fsdp=2: the reference is one fsdp-sharded argument replicated over
    runs; curves equal the one-device sweep's and the stacked program's on the same mesh."""
    res = run_mesh_sweep_script(MESH_BODY, GRPO_TINY, tmp_path)
    print(res)
    assert set(res) == {"mesh_vs_one_device", "shared_vs_stacked_on_mesh"}

