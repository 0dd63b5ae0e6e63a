"""`rlhf-jax <trainer> --print-config`: the resolved config, one documented line per leaf key, and
nothing built or written; the one-line docs come from the config dataclasses themselves."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax import cli
from rlhf_jax.config import config_sections, describe, field_doc, format_config, to_dict
from rlhf_jax.trainers import TRAINERS, load

ROOT = Path(__file__).resolve().parents[1]
PPO_TINY = str(ROOT / "experiments" / "ppo_sort_tiny.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_ppo_print_config_resolves_documents_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "ppo", "--config", PPO_TINY, "--print-config",
                           "ppo.kl_coef=0.3"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ppo.hparams.kl_coef = "))
    key_value, _, note = line.partition("  # ")
    assert key_value == "ppo.hparams.kl_coef = 0.3"
    assert note.endswith("(default: 0.05)") and "β" in note  # its doc text, then the class default
    assert "out_dir = \"runs/ppo_sort_tiny\"" in proc.stdout  # the config file is applied
    assert "ppo.kl_coef" in proc.stdout  # the short form of hyper-parameters is mentioned
    assert os.listdir(tmp_path) == []  # no run directory, no file


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_leaf_key_of_every_trainer_config_is_printed(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([name, "--print-config", "task=sort"]) == 0
    out = capsys.readouterr().out
    printed = {line.split(" = ", 1)[0] for line in out.splitlines() if line and not line.startswith("#")}
    cfg = dataclasses.replace(load(TRAINERS[name][0])(), task="sort")
    assert printed == set(_leaves(to_dict(cfg)))
    for line in out.splitlines():
        if line and not line.startswith("#"):
            assert "  # " in line and "(default: " in line, line
    for section, _ in config_sections(cfg):  # grouped by section, each with a header
        assert f"# [{section}]" in out
    assert os.listdir(tmp_path) == []


def test_pipeline_print_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pipeline", "--print-config", "ppo.ppo.kl_coef=0.2"]) == 0
    out = capsys.readouterr().out
    assert "ppo.ppo.hparams.kl_coef = 0.2  # " in out and "sft.optim.learning_rate = " in out
    assert os.listdir(tmp_path) == []


def test_unknown_key_fails_with_status_2_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "ppo", "--print-config", "ppo.klcoef=0.3"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "'ppo.klcoef'" in proc.stderr and proc.stdout == ""
    assert os.listdir(tmp_path) == []


def test_a_config_the_trainer_refuses_is_printed_then_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", "--print-config"]) == 2  # no task and no data.path
    captured = capsys.readouterr()
    assert "data.path = \"\"" in captured.out and "'data.path'" in captured.err


def test_trainer_help_names_sections_and_print_config():
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "ppo", "--help"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    out = proc.stdout
    flat = " ".join(out.split())
    assert "--print-config' shows every key" in flat
    for section in ("data", "mesh", "checkpoint", "log", "policy", "reward", "optim", "ppo", "ppo.hparams"):
        assert f"  {section}: " in out, section
    assert "data: the data section" in out and "ppo: PPO's section of a trainer config: static settings" in out


def test_top_level_help_imports_no_jax():
    code = "import sys; from rlhf_jax import cli; cli.main(['--help']); print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'wandb')))"
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout[-300:]


# ---- where the docs come from ----

@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner section. alpha: from the docstring. beta (second item; inline)."""
    alpha: int = 1
    beta: float = 2.0      # from the comment
    gamma: str = "x"


@dataclasses.dataclass(frozen=True)
class _Outer:
    """The outer config.

    inner: the inner section. delta, epsilon: shared by a list. zeta (0 = off); eta.
    """
    # the comment line above delta
    delta: int = dataclasses.field(default=0, metadata={"doc": "from the metadata"})
    epsilon: int = 0
    zeta: int = 0
    eta: int = 0
    inner: _Inner = _Inner(alpha=5)


def test_field_doc_sources_in_order():
    assert field_doc(_Outer, "delta") == "from the metadata"  # metadata beats the comment and docstring
    assert field_doc(_Inner, "beta") == "from the comment"  # the comment beats the docstring
    assert field_doc(_Inner, "alpha") == "from the docstring"
    assert field_doc(_Outer, "epsilon") == "shared by a list"
    assert field_doc(_Outer, "zeta") == "zeta (0 = off)"
    assert field_doc(_Outer, "eta") == ""  # listed by name only
    assert field_doc(_Inner, "gamma") == ""
    assert field_doc(_Outer, "inner") == "the inner section"


def test_describe_values_defaults_and_format():
    cfg = dataclasses.replace(_Outer(), inner=_Inner(alpha=7, gamma="y"))
    rows = {r.key: r for r in describe(cfg)}
    assert list(rows) == ["delta", "epsilon", "zeta", "eta", "inner.alpha", "inner.beta", "inner.gamma"]
    assert rows["inner.alpha"].value == 7 and rows["inner.alpha"].default == 5  # the class's own default
    text = format_config(cfg)
    assert 'inner.gamma = "y"  # (default: "x")' in text
    assert "# [inner] the inner section" in text
