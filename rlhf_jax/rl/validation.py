"""Range checks of algorithm config fields: a ``ConfigError`` naming the key, the value and what was expected."""
from __future__ import annotations

from typing import Any, Sequence

from rlhf_jax.config import ConfigError


def concrete(value: Any) -> bool:
    """A value given as a Python number (not a traced or stacked array, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(prefix: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config key {prefix + name!r}: expected an integer >= {minimum}, got {value!r}")


def check_positive(prefix: str, name: str, value: Any, *, strict: bool = True) -> None:
    """``value > 0`` (``>= 0`` when not ``strict``) when it is a Python number."""
    if not concrete(value):
        return
    if value < 0 or (strict and value == 0) or value != value:
        raise ConfigError(f"config key {prefix + name!r}: expected a number {'>' if strict else '>='} 0, "
                          f"got {value!r}")


def fail(prefix: str, name: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key {prefix + name!r}: expected {expected}, got {value!r}")


def check_choice(prefix: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        fail(prefix, name, value, "|".join(map(str, allowed)))


def check_policy_hparams(prefix: str, hp: Any, non_negative: Sequence[str]) -> None:
    """The hyper-parameters every online algorithm has: temperature > 0, clip ranges > 0, 0 < top_p <= 1,
    and the named fields >= 0 (values given as Python numbers; traced arrays are the caller's)."""
    check_positive(prefix, "temperature", hp.temperature)
    check_positive(prefix, "clip_eps", hp.clip_eps)
    if concrete(hp.clip_eps_high):
        check_positive(prefix, "clip_eps_high", hp.clip_eps_high)
    if concrete(hp.top_p) and not 0 < hp.top_p <= 1:
        fail(prefix, "top_p", hp.top_p, "a number in (0, 1]")
    if concrete(hp.score_clip):
        check_positive(prefix, "score_clip", hp.score_clip)
    for name in ("lr", "kl_coef", "missing_eos_penalty", *non_negative):
        check_positive(prefix, name, getattr(hp, name), strict=False)
