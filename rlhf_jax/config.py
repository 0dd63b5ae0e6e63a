"""One config system for the whole project: frozen, nested dataclasses.

Every trainer defines its config as a ``@dataclasses.dataclass(frozen=True)``
(nested dataclasses for sub-sections). Experiment files return one from
``get_config()``. Command-line overrides use dotted keys and are validated
against the dataclass fields and their annotated types *before* anything is
built or compiled::

    cfg = apply_overrides(cfg, ["ppo.kl_coef=0.02", "seed=3"])
    cfg = apply_overrides(cfg, ["--config.ppo.kl_coef=0.02"])   # same thing
    cfg = apply_overrides(cfg, ["ppo.hparams.kl_coef=0.02"])    # same thing: the full key

An algorithm section (``ppo``, ``grpo``, ``dpo``, ...) holds its traced hyper-parameters in a
nested ``hparams`` section; they may be named directly under the algorithm section.

An unknown key or a value of the wrong type raises ``ConfigError`` naming the
key and what was expected.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from rlhf_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key."""


# An algorithm section keeps its traced hyper-parameters in a nested section of this name; a key
# that names one of them directly under the algorithm section (``ppo.kl_coef``) resolves into it
# (``ppo.hparams.kl_coef``).
HPARAMS = "hparams"


def _is_dc(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward refs we cannot resolve: fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _parse_literal(text: str) -> Any:
    low = text.strip()
    if low.lower() in ("none", "null"):
        return None
    if low.lower() == "true":
        return True
    if low.lower() == "false":
        return False
    try:
        return ast.literal_eval(low)
    except (ValueError, SyntaxError):
        return low  # a bare string


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Converts ``value`` to ``annotation`` or raises ConfigError naming ``key``."""
    if annotation is Any or annotation is dataclasses.MISSING:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: {value!r} matches none of {annotation}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key!r}: expected one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [_parse_literal(v) for v in value.split(",")] if value else []
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # "stop_ids=7" on the command line means (7,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a sequence, got {value!r}")
        if args and not (len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return from_dict(annotation, value, prefix=key + ".")
        raise ConfigError(f"config key {key!r}: expected a {annotation.__name__} section, got {value!r}")
    return value


def from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a (nested) mapping, validating every key."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(prefix + k, v, hints.get(k, Any)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section {prefix or cls.__name__!r}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict view of a config (JSON-serialisable for run records)."""
    def conv(x):
        if _is_dc(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, Path):
            return str(x)
        return x
    return conv(cfg)


def replace_path(cfg: Any, dotted: str, value: Any, *, parse: bool = False) -> Any:
    """Returns a copy of ``cfg`` with the field at ``dotted`` set (validated)."""
    head, _, rest = dotted.partition(".")
    if not _is_dc(cfg):
        raise ConfigError(f"config key {dotted!r}: {type(cfg).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names and HPARAMS in names and _is_dc(getattr(cfg, HPARAMS)) and \
            head in {f.name for f in dataclasses.fields(getattr(cfg, HPARAMS))}:
        # ``ppo.kl_coef`` is short for ``ppo.hparams.kl_coef``
        return dataclasses.replace(cfg, **{HPARAMS: replace_path(getattr(cfg, HPARAMS), dotted, value, parse=parse)})
    if head not in names:
        hint = ""
        if HPARAMS in names and _is_dc(getattr(cfg, HPARAMS)):
            hint = f"; hyper-parameters: {sorted(f.name for f in dataclasses.fields(getattr(cfg, HPARAMS)))}"
        raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {sorted(names)}{hint}")
    current = getattr(cfg, head)
    if rest:
        if not _is_dc(current):
            raise ConfigError(f"config key {dotted!r}: {head!r} is not a section")
        return dataclasses.replace(cfg, **{head: replace_path(current, rest, value, parse=parse)})
    annotation = _field_types(type(cfg)).get(head, Any)
    if parse and isinstance(value, str):
        # strings stay strings when the field wants a string
        wants_str = annotation is str or (
            typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and str in typing.get_args(annotation)
            and value.lower() not in ("none", "null"))
        value = value if wants_str else _parse_literal(value)
    return dataclasses.replace(cfg, **{head: _coerce(head if not rest else dotted, value, annotation)})


def parse_override(text: str) -> tuple[str, str]:
    """``"--config.a.b=1"`` or ``"a.b=1"`` -> ``("a.b", "1")``."""
    body = text[2:] if text.startswith("--") else text
    if body.startswith("config."):
        body = body[len("config."):]
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (e.g. ppo.kl_coef=0.02)")
    key, value = body.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key, value


def apply_overrides(cfg: Any, overrides: Iterable[str]) -> Any:
    """Applies ``KEY=VALUE`` overrides (dotted keys), validating each one."""
    for text in overrides:
        key, value = parse_override(text)
        try:
            cfg = replace_path(cfg, key, value, parse=True)
        except ConfigError as e:
            msg = str(e)
            if key not in msg:
                msg = f"config key {key!r}: {msg}"
            raise ConfigError(msg) from None
    return cfg


def _user_code_line(exc: BaseException, path: Path) -> str:
    """``":LINE"`` of the innermost traceback frame inside ``path`` (the line of the user's file)."""
    line = ""
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def load_config_file(path: str | Path, *, arg: str | None = None) -> Any:
    """Imports a Python config file and returns its ``get_config(arg)``.

    A file that is missing, does not import (syntax error, failing import, an exception at module
    level) or whose ``get_config()`` raises is a ConfigError naming the file and line; the original
    exception is chained (``--debug`` shows it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    spec = importlib.util.spec_from_file_location(f"_rlhf_cfg_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {str(path)!r}: not a Python file (expected a .py file with get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # the user's code failed: name where, keep the cause chained
        raise ConfigError(f"config file {path}{_user_code_line(e, path)}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    try:
        return module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the user's get_config() failed
        raise ConfigError(f"config file {path}{_user_code_line(e, path)}: get_config() raised "
                          f"{type(e).__name__}: {e}") from e


def dump_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
