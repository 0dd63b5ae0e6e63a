"""The benchmark harness (issue 10): the suite runs end to end on a minuscule shape in quick mode,
writes a table and a JSON of the documented structure, builds identical shapes on both sides,
orients every ratio as a speed-up, and runs TRL's PPOTrainer on four tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import data, report, run, shapes, timing, torch_side, weight_grad
from benchmarks.report import Row


def test_ratio_is_a_speedup_in_both_directions():
    rate = Row(item="sft", shape="t", metric="tokens/s", ours=300.0, peer=100.0, peer_name="p",
               higher_is_better=True, target=1.2)
    secs = Row(item="ppo", shape="t", metric="s/iteration", ours=2.0, peer=11.0, peer_name="p",
               higher_is_better=False, target=5.0)
    assert rate.ratio == pytest.approx(3.0) and rate.met is True
    assert secs.ratio == pytest.approx(5.5) and secs.met is True
    slow = Row(item="ppo", shape="t", metric="s/iteration", ours=4.0, peer=11.0, peer_name="p",
               higher_is_better=False, target=5.0)
    assert slow.ratio == pytest.approx(2.75) and slow.met is False
    mfu = Row(item="mfu", shape="t", metric="MFU", ours=0.42, peer=0.3, peer_name="p", higher_is_better=True,
              target=0.5, target_on="ours")
    assert mfu.met is False and mfu.ratio == pytest.approx(1.4)
    missing = Row(item="sft", shape="t", metric="tokens/s", ours=None, peer=10.0, peer_name="p",
                  higher_is_better=True, target=1.2, status="not available", note="x missing")
    assert missing.ratio is None and missing.met is None
    with pytest.raises(ValueError, match="status"):
        Row(item="a", shape="b", metric="c", ours=1.0, peer=1.0, peer_name="p", higher_is_better=True,
            status="fine")


def test_markdown_table_has_one_line_per_row_and_says_not_available():
    rows = [
        Row(item="sft", shape="tiny", metric="train tokens/s", ours=1500.0, peer=1000.0, peer_name="PyTorch loop",
            higher_is_better=True, target=1.2, probe_gflops=50.0),
        Row(item="gen", shape="tiny", metric="new tokens/s", ours=None, peer=None, peer_name="transformers",
            higher_is_better=True, status="not available", note="bench_generate | missing"),
    ]
    lines = report.markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") - line.count("\\|") == 12 for line in lines)
    assert "| 1.50× | ≥ 1.2× | yes |" in lines[2]
    assert "**not available**: bench_generate \\| missing" in lines[3]


def test_time_calls_excludes_warmup():
    calls = []
    t = timing.time_calls(lambda: calls.append(1), reps=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3
    assert t.best <= t.median and t.best >= 0
    with pytest.raises(ValueError, match="reps"):
        timing.time_calls(lambda: None, reps=0)


def test_unknown_item_and_shape_fail_with_the_choices():
    with pytest.raises(SystemExit, match="unknown item"):
        run._items("sft,fast")
    with pytest.raises(ValueError, match="unknown benchmark shape 'huge'"):
        shapes.get_shape("huge")


@pytest.mark.parametrize("head", ["causal", "scalar"])
def test_both_sides_build_the_same_shape(head):
    """Same parameter count from the HF config dict in transformers and in rlhf_jax."""
    from benchmarks import jax_side
    from rlhf_jax.models import count_params

    shape = shapes.get_shape("micro")
    torch_model = torch_side.build_model(shape, head=head)
    n_torch = sum(p.numel() for p in torch_model.parameters())
    _, params = jax_side.build(shape, head=head)
    assert count_params(params) == n_torch


def test_random_batches_are_shifted_and_avoid_special_ids():
    b = data.sft_batch(vocab=50, batch=3, seq=7, seed=1)
    assert b["input_ids"].shape == (3, 7)
    np.testing.assert_array_equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    assert b["input_ids"].min() >= data.FIRST_ID and b["targets"].max() < 50
    p = data.preference_batch(vocab=50, pairs=2, seq=5)
    assert p["chosen_ids"].shape == p["rejected_ids"].shape == (2, 5)


def test_trl_ppo_trainer_runs_on_four_tiny_models():
    shape = shapes.get_shape("micro")
    prompts = data.prompts(shape["vocab_size"], batch=2, length=4)["prompt_ids"]
    res = torch_side.trl_ppo_iteration_time(shape, prompts, response_length=3, epochs=1, minibatches=1, iterations=2)
    assert len(res["times_s"]) == 2 and res["median_s"] > 0


def test_trl_ppo_peer_steps_once_per_minibatch_like_ours():
    """4 prompts, 2 epochs x 2 minibatches: 4 optimizer steps per iteration (no accumulation over
    the minibatches), each iteration over all 4 prompts; run in a child process as the suite does."""
    shape = shapes.get_shape("micro")
    prompts = data.prompts(shape["vocab_size"], batch=4, length=4)["prompt_ids"]
    res = run.in_child(torch_side.trl_ppo_iteration_time, shape, prompts, response_length=3, epochs=2,
                       minibatches=2, iterations=2)
    assert res["optimizer_steps"] == 2 * 2 * 2
    assert len(res["times_s"]) == 2 and res["gc_s_per_iteration"] >= 0


def test_quick_suite_on_micro_shape_writes_table_and_json(tmp_path, capsys):
    rc = run.main(["--quick", "--shapes", "micro", "--workload", "micro", "--only", "sft,rm,mfu",
                   "--out", str(tmp_path), "--no-install", "--reps", "1"])
    assert rc == 0, "a benchmark side raised (see the captured traceback)"
    result = json.loads((tmp_path / "latest.json").read_text())
    assert {"date", "command", "machine", "probes", "rows", "workload", "dtype"} <= set(result)
    assert result["command"].startswith("python -m benchmarks.run --quick --shapes micro") and result["complete"]
    assert result["probes"]["matmul_peak_flops"] > 0 and result["probes"]["copy_bandwidth_bytes_per_s"] > 0
    rows = result["rows"]
    assert [(r["item"], r["shape"], r["peer_name"]) for r in rows] == [
        ("sft", "micro", "PyTorch loop"), ("sft", "micro", f"trl {run.TRL_VERSION} SFTTrainer"),
        ("rm", "micro", "PyTorch loop"), ("mfu", "micro", "PyTorch loop"), ("mfu", "micro", "PyTorch loop")]
    assert [r["metric"] for r in rows[-2:]] == ["SFT-step MFU", "RM-step MFU"]
    # the reward model's FLOPs: chosen and rejected rows, no LM head (6 d V a token with the backward)
    from benchmarks import jax_side

    shape, wl = shapes.get_shape("micro"), shapes.get_workload("micro")
    lm_head = 6 * shape["hidden_size"] * shape["vocab_size"]
    assert rows[-1]["details"]["flops_per_step"] == pytest.approx(
        (jax_side.flops_per_token(shape, wl.rm_seq) - lm_head) * 2 * wl.rm_pairs * wl.rm_seq)
    for r in rows:
        assert r["status"] in report.STATUSES
        assert r["peer"] is not None and r["peer"] > 0  # the PyTorch peers always run on CPU
        if r["status"] == "ok":
            assert r["ours"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["peer"])
        else:
            assert r["ours"] is None and r["note"]
    md = (tmp_path / "latest.md").read_text()
    assert md.count("| micro |") == 5 and "matmul peak" in md
    assert "| item | shape | metric |" in capsys.readouterr().out


@pytest.mark.parametrize("program", ["sft", "decode"])
def test_profile_folds_a_trace_onto_the_models_op_names(program, capsys, tmp_path):
    from benchmarks import profile

    hlo = tmp_path / "step.hlo"
    assert profile.main([program, "--shape", "micro", "--workload", "micro", "--reps", "1", "--depth", "4",
                         "--hlo", str(hlo)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{program} / micro: first call") and "traced instruction time" in lines[0]
    rows = [ln.split("ms", 1) for ln in lines[1:]]
    assert rows and all(float(ms) >= 0 for ms, _ in rows)
    # the time is attributed to named parts of the program, not left unexplained
    assert any(("CausalLM" in name) or ("model" in name) for _, name in rows)
    assert "HloModule" in hlo.read_text()


@pytest.mark.parametrize("name", ["micro", "tiny", "gpt2"])
def test_decode_matmul_shapes_cover_every_projection_and_the_head(name):
    """The matmuls timed as 'matmuls alone' read exactly the model's projection and LM-head weights."""
    import jax

    from benchmarks import bench_generate
    from rlhf_jax.models import CausalLM, ModelConfig

    config = ModelConfig.from_hf(shapes.get_shape(name), dtype="float32")
    abstract = jax.eval_shape(lambda: CausalLM(config).init(jax.random.key(0), jax.numpy.zeros((1, 1), "int32")))
    kernels = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(abstract)
                  if "kernel" in jax.tree_util.keystr(path))
    head = config.hidden_size * config.vocab_size if config.tie_word_embeddings else 0  # tied: the embedding
    mm = bench_generate.decode_matmul_shapes(config)
    assert sum(k * n for k, n in mm) == kernels + head
    if name == "micro":
        for side in ("jax", "torch", "numpy"):
            assert 0 < bench_generate.matmul_step_seconds(mm, 2, side=side, reps=1) < 10


# ---------------------------------------------------------------- the accelerator script (issue 22)

def _gpu_context(**overrides) -> run.Context:
    """The Context ``run.run`` makes on a GPU (bf16 compute, data-sheet peak and HBM bandwidth of an H100),
    at the micro workload: the items then take their GPU code paths (no PyTorch peer, bf16-stored
    generation weights, GRPO's MFU target) while computing on this CPU."""
    kw = dict(quick=False, workload=shapes.get_workload("micro"), platform="gpu", dtype="bfloat16", reps=1,
              peak_flops=989e12, peak_source="test: H100 data sheet", hbm_bytes_per_s=3.35e12, allow_install=False,
              tunix_venv=None, copy_bandwidth=1e10, attention_impl="auto", gen_batches=(2, 3), logits_chunk=8)
    kw.update(overrides)
    return run.Context(**kw)


def _iteration_flops_by_hand(shape: dict, algo: str, wl) -> float:
    """Per token of the rollout's rows x (prompt + response): PPO samples, scores old log-probs and the
    reference (3 policy forwards), runs the value and reward models (2 forwards), then trains policy and
    value for its epochs; GRPO: 3 policy forwards + the reward model, then the policy's epochs. All four
    models have the policy's shape; the value and reward models are scalar-head models without the LM head
    (2·d·V a forward, 6·d·V with the backward)."""
    from rlhf_jax.models import ModelConfig, flops_per_token

    seq = wl.rl_prompt + wl.rl_response
    lm = ModelConfig.from_hf(shape)
    fwd, train = flops_per_token(lm, seq, training=False), flops_per_token(lm, seq, training=True)
    head = lm.hidden_size * lm.vocab_size
    sfwd, strain = fwd - 2 * head, train - 6 * head
    if algo == "ppo":
        return (3 * fwd + 2 * sfwd + wl.rl_ppo_epochs * (train + strain)) * wl.rl_ppo_prompts * seq
    return (3 * fwd + sfwd + wl.rl_grpo_epochs * train) * wl.rl_grpo_prompts * wl.rl_group * seq


def test_rl_item_times_fused_ppo_and_grpo_with_rollout_share_and_mfu():
    ctx = _gpu_context()
    rows = run.item_rl(ctx, ["micro"])
    assert [r.metric for r in rows] == [f"{a} {m}" for a in ("PPO", "GRPO")
                                        for m in ("s/iteration", "rollout share", "iteration MFU")]
    assert all(r.status == "ok" and r.item == "rl" and r.shape == "micro" for r in rows), [r.note for r in rows]
    wl = ctx.workload
    for algo, (sec, share, mfu) in zip(("ppo", "grpo"), (rows[:3], rows[3:])):
        res = sec.details
        assert len(res["times_s"]) == 2 and sec.ours == pytest.approx(res["times_s"][1])
        assert res["rollout_rows"] == (wl.rl_ppo_prompts if algo == "ppo" else wl.rl_grpo_prompts * wl.rl_group)
        assert res["flops"] == pytest.approx(_iteration_flops_by_hand(shapes.get_shape("micro"), algo, wl))
        # (micro: milliseconds, one timed call each on a shared machine: the share's value is noise here)
        assert share.ours > 0 and share.ours == pytest.approx(res["rollout_s"] / res["median_s"])
        assert mfu.ours == pytest.approx(res["flops"] / res["median_s"] / ctx.peak_flops)
        assert np.isfinite(res["metrics"]["loss"])
    assert rows[5].target == run.TARGETS["rl_mfu_grpo"] and rows[5].target_on == "ours" and rows[2].target is None


def test_gen_item_takes_a_batch_list_and_counts_bf16_weight_bytes_in_the_floor():
    from rlhf_jax.models import count_params

    ctx = _gpu_context()
    rows = run.item_gen(ctx, ["micro"])
    assert [r.metric for r in rows] == ["new tokens/s (greedy)", "new tokens/s (sampling)", "decode step ms (batch 2)",
                                        "new tokens/s (greedy, batch 3)"]
    rates = [rows[i] for i in (0, 1, 3)]
    assert all(r.ours > 0 and r.peer is None and r.status == "not available" and "PyTorch" in r.note for r in rates)
    decode = rows[2]
    d = decode.details
    # at the micro shape a decode step is microseconds of noise (it can come out negative): the row's
    # plumbing is what is checked, floor / step as a speed-up with the GPU target step <= 1.5x the floor
    assert decode.status == "ok" and decode.peer > 0 and decode.ours == pytest.approx(d["decode_step_s"] * 1e3)
    assert not decode.higher_is_better and decode.target == pytest.approx(1 / 1.5, abs=1e-3)
    shape = shapes.get_shape("micro")
    assert d["param_dtype"] == "bfloat16" and d["batch"] == 2
    # bf16 storage: 2 bytes a weight; untied micro: the input embedding is read as `batch` gathered rows
    n = d["params"]
    assert n == count_params(run._ours("build")(shape)[1])
    embed = shape["vocab_size"] * shape["hidden_size"]
    assert d["weight_bytes"] == 2 * (n - embed) + 2 * shape["hidden_size"] * 2
    assert decode.peer == pytest.approx(d["bytes_per_step"] / ctx.hbm_bytes_per_s * 1e3)


def test_attn_and_chunk_items_compare_the_sft_step_with_one_option_changed():
    import dataclasses

    from rlhf_jax.training import SFTStepConfig

    ctx = _gpu_context(attention_impl="blocked")  # micro rows are 16 tokens: force the tiles, one padded block
    attn, = run.item_attn(ctx, ["micro"])
    assert attn.status == "ok" and attn.peer_name == "same step, attention_impl=xla" and attn.ours > 0 and attn.peer > 0
    assert attn.details["ours"]["attention"] == "blocked" and attn.details["peer"]["attention"] == "xla"
    # same weights, same batch: the two implementations' first losses agree (bf16 compute)
    assert attn.details["first_loss_abs_diff"] < 2e-2 * abs(attn.details["ours"]["first_loss"])
    assert attn.details["ours"]["temp_bytes"] > 0
    chunk, = run.item_chunk(ctx, ["micro"])
    if "logits_chunk" in {f.name for f in dataclasses.fields(SFTStepConfig)}:
        assert chunk.status == "ok" and chunk.ours > 0 and chunk.peer > 0
        assert chunk.details["first_loss_abs_diff"] < 2e-2 * abs(chunk.details["peer"]["first_loss"])
    else:  # the chunked SFT loss is not in this tree: the row says so instead of failing the run
        assert chunk.status == "not available" and "SFTStepConfig has no logits_chunk" in chunk.note


def test_item_shapes_and_gen_batches_options():
    assert run._item_shapes("rl=llama1b,gen=gpt2+llama1b") == {"rl": ["llama1b"], "gen": ["gpt2", "llama1b"]}
    assert run._item_shapes("") == {}
    for bad in ("rl", "fast=micro", "rl=huge", "rl=micro,rl=tiny", "rl="):
        with pytest.raises(SystemExit, match="--item-shapes"):
            run._item_shapes(bad)
    assert run._batches("16, 64,256", 16) == (16, 64, 256) and run._batches("", 16) == (16,)
    for bad in ("16,x", "0", "16,16", ","):
        with pytest.raises(SystemExit, match="--gen-batches"):
            run._batches(bad, 16)
    # the accelerator items run only when named: the default CPU suite is unchanged
    import argparse

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    assert run._items(parser.parse_args([]).only) == list(run.DEFAULT_ITEMS)


def test_gpu_check_script_is_valid_bash_and_its_benchmark_options_parse():
    """The one accelerator script's `benchmarks.run` command line, parsed by the suite's own parser and
    checked by the functions run() calls: a typo here would cost a GPU session."""
    import argparse
    import re
    import shlex
    import subprocess
    from pathlib import Path

    script = Path(run.__file__).resolve().parent / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}$", text, re.M))  # NAME=${NAME:-default}
    assert "-m benchmarks.attention_check" in text and defaults["ATTENTION_IMPL"] == "auto"
    assert {"BENCH_ITEMS", "SHAPES", "LARGE", "GEN_BATCHES", "BENCH_ARGS", "OUT"} <= set(defaults)
    line = re.search(r"-m benchmarks\.run (.*?)\s*>", text.replace("\\\n", " "), re.S).group(1)
    line = re.sub(r"\$(\w+)", lambda m: defaults[m.group(1)], line)
    argv = shlex.split(line)
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    args = parser.parse_args(argv)
    assert run._items(args.only) == ["sft", "rm", "mfu", "rl", "gen", "attn", "chunk"]
    assert run._item_shapes(args.item_shapes) == {k: ["llama1b"] for k in ("rl", "gen", "attn", "chunk")}
    assert [s for s in args.shapes.split(",")] == ["gpt2", "llama1b"] and all(
        shapes.get_shape(s) for s in args.shapes.split(","))
    assert run._batches(args.gen_batches, 16) == (16, 64, 256) and args.no_install and args.attention_impl == "auto"
    for test_file in re.findall(r"tests/test_\w+\.py", text):
        assert (script.parent.parent / test_file).is_file(), test_file


def test_attention_check_compares_auto_with_xla_in_bf16(capsys):
    """The script's gate before the benchmark (on CPU "auto" is the blocked attention at its T = 128)."""
    from benchmarks import attention_check

    import re

    assert attention_check.main([]) == 0
    out = capsys.readouterr().out
    assert "auto = blocked" in out and out.rstrip().endswith(": ok")
    dist = float(re.search(r"relative distance ([0-9.e+-]+)", out).group(1))
    assert 0 < dist <= attention_check.GRAD_RTOL  # bf16 rounding: two implementations, not one program twice


def test_weight_grad_benchmark_grid_and_step_comparison_on_micro_shapes():
    rows = weight_grad.grid(m=32, shapes=[(8, 4096), (16, 24)], reps=1)
    assert [r["rule_copies"] for r in rows] == [True, False]
    assert all(r["eigen_gflops"] > 0 and r["copied_gflops"] > 0 for r in rows)
    for kind in ("sft", "rm"):
        out = weight_grad.compare_step(kind, "micro", reps=1, batch_size=2, seq_len=16)
        assert out["on"] > 0 and out["off"] > 0
        assert out["loss_on"] == out["loss_off"]  # the rule changes the backward pass only
