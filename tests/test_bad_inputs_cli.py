"""What users get wrong on the command line, table-driven: each bad input ends as ONE message on stderr
that names the file/key/argument and what was expected, exit status 2, and no file changed.

Also the run directory's guarantees: a refused command leaves every existing file byte-identical, a
directory is held by one process at a time, a resume whose config changes the computation is refused
with the differing keys, and a resume recovers from a corrupt checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_jax.cli import main
from rlhf_jax.training.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SFT = ["task=sort", "model.name=task", "model.hidden_size=32", "model.intermediate_size=64", "data.batch_size=4",
       "data.max_length=32", "log.progress=false", "log.tensorboard=false", "eval_batches=1", "eval_every=0"]
PPO = ["task=sort", "iterations=1", "sample_every=0", "export=false", "log.progress=false", "log.tensorboard=false",
       "policy.hidden_size=16", "policy.head_dim=8", "policy.intermediate_size=32", "ppo.batch_size=4",
       "ppo.max_new_tokens=6", "ppo.ppo_epochs=1"]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the run directory and the inputs)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_inputs(tmp: Path) -> dict[str, str]:
    """Files the cases point at; ``{name}`` placeholders in the cases are replaced by these paths."""
    (tmp / "inputs").mkdir()
    files = {
        "syntax_cfg": "def get_config(:\n    pass\n",
        "raising_cfg": "from rlhf_jax.training.sft import SFTConfig\n\n\ndef get_config():\n"
                       "    return SFTConfig(stepz=3)\n",
        "import_cfg": "import no_such_module_xyz\n",
        "noget_cfg": "X = 1\n",
        "wrongtype_cfg": "from rlhf_jax.rl import DPOTrainConfig\n\n\ndef get_config():\n"
                         "    return DPOTrainConfig()\n",
        "old_hparams_cfg": "from rlhf_jax.rl import PPOConfig, PPOTrainConfig\n\n\ndef get_config():\n"
                           "    return PPOTrainConfig(ppo=PPOConfig(kl_coef=0.1))\n",
        "a_file": "not a directory\n",
        "sft.jsonl": '{"prompt": "sort 3 1", "completion": " 1 3"}\n',
    }
    out = {}
    for name, text in files.items():
        path = tmp / "inputs" / (name if "." in name else f"{name}.py" if name.endswith("cfg") else name)
        path.write_text(text)
        out[name] = str(path)
    (tmp / "inputs" / "model_dir").mkdir()
    out["model_dir"] = str(tmp / "inputs" / "model_dir")  # no config.json
    out["missing"] = str(tmp / "inputs" / "no_such_file.jsonl")
    return out


# (id, argv with {placeholders}, substrings the message must contain)
CASES = [
    ("unknown-key", ["sft", *SFT, "stepz=3"], ["stepz"]),
    ("unknown-nested-key", ["sft", *SFT, "optim.learnin_rate=1e-3"], ["optim.learnin_rate"]),
    ("wrong-type", ["sft", *SFT, "steps=many"], ["steps", "integer"]),
    ("negative-steps", ["sft", *SFT, "steps=0"], ["steps", ">= 1"]),
    ("bad-literal", ["sft", *SFT, "model.dtype=float8"], ["model.dtype", "float32"]),
    ("not-key-value", ["sft", *SFT, "steps"], ["KEY=VALUE"]),
    ("bad-optim-range", ["sft", *SFT, "optim.min_lr_ratio=2"], ["optim.min_lr_ratio"]),
    ("bad-regex", ["sft", *SFT, "optim.freeze=[("], ["optim.freeze"]),
    ("missing-data-file", ["sft", *SFT, "data.path={missing}"], ["data.path", "no_such_file.jsonl"]),
    ("missing-eval-file", ["sft", *SFT, "eval_path={missing}"], ["eval_path", "no_such_file.jsonl"]),
    ("unknown-task", ["sft", *SFT, "task=chess"], ["task", "chess"]),
    ("no-data-no-task", ["sft", "task=", "model.name=tiny", "data.tokenizer=" + "x"], ["data.path"]),
    ("model-path-not-dir", ["sft", *SFT, "model.path={a_file}"], ["model.path", "not a directory"]),
    ("model-path-no-config", ["sft", *SFT, "model.path={model_dir}"], ["model.path", "config.json"]),
    ("tokenizer-missing", ["sft", *SFT, "data.tokenizer={missing}"], ["data.tokenizer"]),
    ("mesh-not-dividing", ["sft", *SFT, "mesh.data=3"], ["mesh.data"]),
    ("micro-batches", ["sft", *SFT, "micro_batches=3"], ["micro_batches"]),
    ("config-missing", ["sft", "--config", "{missing}"], ["config file", "no_such_file.jsonl", "does not exist"]),
    ("config-syntax", ["sft", "--config", "{syntax_cfg}"], ["syntax_cfg.py:1", "syntax error"]),
    ("config-raises", ["sft", "--config", "{raising_cfg}"], ["raising_cfg.py:5", "stepz"]),
    ("config-bad-import", ["sft", "--config", "{import_cfg}"], ["import_cfg.py:1", "no_such_module_xyz"]),
    ("config-no-get-config", ["sft", "--config", "{noget_cfg}"], ["noget_cfg.py", "get_config"]),
    ("config-wrong-trainer", ["sft", "--config", "{wrongtype_cfg}"], ["wrongtype_cfg.py", "DPOTrainConfig",
                                                                      "SFTConfig"]),
    ("config-old-hparams", ["ppo", "--config", "{old_hparams_cfg}"], ["old_hparams_cfg.py:5", "kl_coef"]),
    ("out-is-a-file", ["sft", *SFT, "steps=1", "--out", "{a_file}"], ["a_file", "is a file"]),
    ("ppo-top-p-zero", ["ppo", *PPO, "ppo.top_p=0"], ["ppo.top_p", "(0, 1]"]),
    ("ppo-negative-lr", ["ppo", *PPO, "ppo.lr=-1e-5"], ["ppo.lr", ">= 0"]),
    ("ppo-temperature", ["ppo", *PPO, "ppo.temperature=0"], ["ppo.temperature", "> 0"]),
    ("ppo-minibatches", ["ppo", *PPO, "ppo.minibatches=3"], ["ppo.minibatches", "divisor"]),
    ("ppo-estimator", ["ppo", *PPO, "ppo.kl_estimator=k9"], ["ppo.kl_estimator", "k1"]),
    ("ppo-unknown-hparam", ["ppo", *PPO, "ppo.beta=0.1"], ["ppo.beta", "kl_coef"]),
    ("ppo-reward-model-no-path", ["ppo", *PPO, "reward.kind=model"], ["reward.path"]),
    ("ppo-reward-function-format", ["ppo", *PPO, "reward.kind=python", "reward.function=nocolon"],
     ["reward.function", "module:function"]),
    ("ppo-too-long", ["ppo", *PPO, "ppo.max_new_tokens=5000"], ["ppo.max_new_tokens", "max_position_embeddings"]),
    ("grpo-group-size", ["grpo", *[a.replace("ppo.", "grpo.") for a in PPO if "ppo_epochs" not in a],
                         "grpo.group_size=1"], ["grpo.group_size", ">= 2"]),
    ("rloo-kl-loss", ["rloo", *[a.replace("ppo.", "rloo.") for a in PPO if "ppo_epochs" not in a],
                      "rloo.use_kl_loss=true"], ["rloo.use_kl_loss"]),
    ("dpo-loss-type", ["dpo", "task=sort", "dpo.loss_type=ppo"], ["dpo.loss_type", "sigmoid"]),
    ("dpo-beta", ["dpo", "task=sort", "dpo.beta=0"], ["dpo.beta", "> 0"]),
    ("dpo-label-smoothing", ["dpo", "task=sort", "dpo.label_smoothing=0.7"], ["dpo.label_smoothing", "0.5"]),
    ("reward-packing", ["reward", "task=sort", "model.name=task", "data.pack=true"], ["data.pack"]),
    ("reward-ranking-k", ["reward", "task=sort", "model.name=task", "ranking_k=1"], ["ranking_k", ">= 2"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message_and_changes_nothing(case, inputs, tmp_path, capsys):
    _, argv, needles = case
    argv = [a.format(**inputs) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    root = Path(inputs["a_file"]).parent
    before = snapshot(root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith(f"rlhf-jax {argv[0]}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(root) == before
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_debug_shows_the_traceback(inputs, tmp_path):
    from rlhf_jax.config import ConfigError
    with pytest.raises(ConfigError, match="stepz"):
        main(["sft", *SFT, "stepz=3", "--debug"])
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "sft", "--config", inputs["syntax_cfg"]],
                          capture_output=True, text=True, env=dict(os.environ, RLHF_JAX_DEBUG="1"), cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "SyntaxError" in proc.stderr


# ------------------------------------------------------------------ the run directory


def _sft(out: Path, *extra: str) -> int:
    # a fixed schedule horizon, so runs of different lengths share their first steps exactly
    return main(["sft", *SFT, "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.async_save=false", "steps=4",
                 "optim.total_steps=8", "log.every=1", "export=false", "--out", str(out), *extra])


def test_refused_commands_leave_the_run_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(out) == 0
    before = snapshot(out)
    for extra, needle in ((["steps=6"], "--resume"),                                  # no --resume
                          (["steps=6", "seed=1", "--resume"], "seed: 0 -> 1"),       # changes the computation
                          (["steps=6", "model.hidden_size=64", "--resume"], "model.hidden_size"),
                          (["steps=6", "optim.learning_rate=1", "--resume"], "optim.learning_rate")):
        capsys.readouterr()
        assert _sft(out, *extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert snapshot(out) == before, extra
    # an allowed change (more steps, a log setting) resumes
    assert _sft(out, "steps=6", "log.every=2", "--resume") == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r][-1] == 6


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rlhf_jax.training.rundir import RunLock
    with RunLock(Path(sys.argv[1])) as lock:
        lock.mark()
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_run_directory_is_held_by_one_process(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _sft(out) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "in use" in err, err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder leaves no stuck lock
    assert _sft(out) == 0


def test_resume_skips_a_corrupt_checkpoint(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _sft(full) == 0
    assert _sft(part, "steps=3") == 0  # checkpoints at 2 and 3 (the final one)
    # corrupt the newest checkpoint's arrays: every file of its state item truncated
    state_dir = part / "checkpoints" / "3" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    capsys.readouterr()
    assert _sft(part, "--resume") == 0
    err = capsys.readouterr().err
    assert "checkpoints/3" in err and "could not be restored" in err, err
    a = [r["train/loss"] for r in read_jsonl(full / "metrics.jsonl") if "train/loss" in r]
    b = [r["train/loss"] for r in read_jsonl(part / "metrics.jsonl") if "train/loss" in r]
    assert b == pytest.approx(a, rel=1e-6)


def test_resume_with_no_restorable_checkpoint_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(out, "steps=2") == 0
    for f in (out / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"")
    capsys.readouterr()
    assert _sft(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and "step 2" in err and "Traceback" not in err, err


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from rlhf_jax.training import checkpoint
    real = checkpoint.CheckpointManager.save

    def save(self, step, *a, **k):
        started = real(self, step, *a, **k)
        if step == 4 and started:
            os.kill(os.getpid(), signal.SIGKILL)  # the async save of step 4 is still being written
        return started

    checkpoint.CheckpointManager.save = save
    from rlhf_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_a_save_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["sft", *SFT, "checkpoint.every=2", "checkpoint.keep=5", "steps=6", "log.every=1", "export=false"]
    assert main([*args, "--out", str(full)]) == 0
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args, "--out", str(killed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    a = [(r["step"], r["train/loss"]) for r in read_jsonl(full / "metrics.jsonl") if "train/loss" in r]
    b = [(r["step"], r["train/loss"]) for r in read_jsonl(killed / "metrics.jsonl") if "train/loss" in r]
    assert [s for s, _ in b] == [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6)
    shutil.rmtree(full)


def test_rl_nan_guard_names_the_iteration(tmp_path, capsys):
    # an infinite learning rate poisons the policy at the first update
    rc = main(["ppo", *PPO, "iterations=3", "ppo.lr=1e30", "ppo.clip_eps=1e30", "--out", str(tmp_path / "nan")])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite" in err and "at iteration" in err, err
