"""The error of a bad argument to the generation API (``generate``, ``generate_text``, helpers)."""
from __future__ import annotations

from rlhf_jax.errors import UserError


class GenerationArgumentError(UserError, ValueError):
    """A bad argument to ``generate`` / ``generate_text``: the message names the argument, its value
    and what is expected."""
