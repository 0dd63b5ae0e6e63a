"""`rlhf-jax bench`: the benchmark suite (see ``benchmarks/run.py`` and ``benchmarks/README.md``)."""
from __future__ import annotations

import argparse
import sys

from benchmarks import run as _run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Same options as ``python -m benchmarks.run``."""
    _run.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the suite; 0 unless a benchmark side raised."""
    return _run.run(args, command=" ".join(["rlhf-jax bench", *sys.argv[2:]]))
