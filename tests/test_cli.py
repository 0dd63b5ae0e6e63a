"""`rlhf-jax` is installed as a console script and every subcommand is wired."""
import importlib
import subprocess
import sys

import pytest

from rlhf_jax import cli


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_fails_clearly():
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "frobnicate"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown command 'frobnicate'" in proc.stderr


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_module_has_the_cli_contract(name):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(getattr(module, "add_arguments"))
    assert callable(getattr(module, "run"))
