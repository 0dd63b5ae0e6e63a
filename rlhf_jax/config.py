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
import functools
import importlib.util
import inspect
import io
import json
import re
import textwrap
import tokenize
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


# ---------------------------------------------------------------------------------------- describing

@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One leaf of a config: its dotted key, current value, default (the config class's own), and its
    one-line doc (see :func:`field_doc`)."""
    key: str
    value: Any
    default: Any
    doc: str


_NO_DEFAULT = object()
_DOC_MAX = 160


def _scan(text: str, start: int, stop) -> int:
    """The first index from ``start`` outside brackets where ``stop(i)`` holds (else ``len(text)``)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and stop(i):
            return i
    return len(text)


def _first_sentence(text: str) -> str:
    """The first sentence of ``text`` (at most ``_DOC_MAX`` characters), stripped of a final period."""
    text = " ".join(text.split())
    text = text[:_scan(text, 0, lambda i: _sentence_end(text, i))].strip(" ;,:")
    if len(text) > _DOC_MAX:
        text = text[:_DOC_MAX].rsplit(" ", 1)[0] + " ..."
    return text


def _class_comments(cls: type) -> dict[str, str]:
    """``field -> comment`` from the class source: a ``# comment`` on the field's line(s), else the
    comment lines right above it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER):
                code_lines.add(tok.start[0])
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[ln] for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1) if ln in comments]
        if not own:  # a block of comment-only lines right above the field
            ln = node.lineno - 1
            while ln in comments and ln not in code_lines:
                own.insert(0, comments[ln])
                ln -= 1
        if own:
            out[node.target.id] = " ".join(own)
    return out


def _plain(doc: str) -> str:
    """A docstring without reST markup: ``:class:`X``` and ````x```` become ``X`` and ``x``."""
    return re.sub(r":[a-z]+:`", "`", doc).replace("`", "")


_ABBREV = ("e.g.", "i.e.", "etc.", "vs.")
_ITEM_START = re.compile(r"(?:^|[.;:,(]\s*|\band\s+|\bor\s+|/\s*)$")


def _sentence_end(text: str, i: int) -> bool:
    return text[i] == "." and (i + 1 == len(text) or text[i + 1] == " ") and \
        not text[max(0, i - 4):i + 1].endswith(_ABBREV)


def _docstring_docs(cls: type, names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Field docs from the class docstring, as two maps: ``labelled`` from ``name: text`` sentences (also
    ``a, b/c: text`` lists), and ``mentioned`` from the clause after the field's first mention at the
    start of an item (``kl_coef β (the fixed β ...);``), else the sentence that mentions it."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
        return {}, {}
    paragraphs = [" ".join(p.split()) for p in _plain(inspect.cleandoc(doc)).split("\n\n")]
    alt = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    mention = re.compile(rf"(?<![\w.=/-])({alt})(?![\w.='/-])")
    labelled_re = re.compile(rf"(?<![\w.=/-])({alt})((?:\s*[,/]\s*(?:{alt}))*)\s*:(?!\S)")

    def clause(text: str, start: int) -> str:
        """From ``start`` to a ``;``, a sentence end, or a new item (another field's mention after a
        comma, another field's label), outside brackets."""
        def stop(i: int) -> bool:
            return (text[i] == ";" or _sentence_end(text, i)
                    or (text[i] == "," and mention.match(text, len(text) - len(text[i + 1:].lstrip())) is not None)
                    or (i > start and text[i - 1] == " " and labelled_re.match(text, i) is not None))
        return text[start:_scan(text, start, stop)].strip(" ,")

    def sentence(text: str, pos: int) -> str:
        begin = max((j + 2 for j in range(pos) if _sentence_end(text, j)), default=0)
        end = next((j for j in range(pos, len(text)) if _sentence_end(text, j)), len(text))
        return text[begin:end]

    labelled: dict[str, str] = {}
    for para in paragraphs:
        for m in labelled_re.finditer(para):
            text = clause(para, m.end())
            for name in [m.group(1)] + re.findall(alt, m.group(2) or ""):
                if text and name not in labelled:
                    labelled[name] = text
    mentioned: dict[str, str] = {}
    at_item: set[str] = set()
    for para in paragraphs:
        for m in mention.finditer(para):
            name = m.group(1)
            if name in at_item:
                continue
            if _ITEM_START.search(para[:m.start()]):
                at_item.add(name)
                text = clause(para, m.end())
                if text:
                    mentioned[name] = f"{name} {text}"
                else:
                    mentioned.pop(name, None)  # listed by name only: no doc
            elif name not in mentioned:
                text = sentence(para, m.start())
                if text.strip() != name:
                    mentioned[name] = text
    return ({k: _first_sentence(v) for k, v in labelled.items() if _first_sentence(v)},
            {k: _first_sentence(v) for k, v in mentioned.items() if _first_sentence(v)})


@functools.lru_cache(maxsize=None)
def _comments_of(cls: type) -> dict[str, str]:
    return _class_comments(cls)


@functools.lru_cache(maxsize=None)
def _docstring_of(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else \
        list(cls.__dict__.get("__annotations__", {}))
    return _docstring_docs(cls, names) if names else ({}, {})


def field_doc(cls: type, name: str, *, loose: bool = True) -> str:
    """The one-line doc of field ``name`` of dataclass ``cls``, from (in order) the field's
    ``metadata={"doc": ...}``, a ``# comment`` on its line in the source of the class that defines it
    (or comment lines right above it), the class docstrings (``name: text`` sentences, else -- when
    ``loose`` -- the clause after the field's first mention; the class's own docstring first, then its
    bases'); else ``""``."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    f = fields.get(name)
    if f is not None and f.metadata.get("doc"):
        return _first_sentence(str(f.metadata["doc"]))
    mro = [k for k in cls.__mro__ if k is not object]
    for klass in mro:  # the defining class (or an overriding subclass) first
        if name in klass.__dict__.get("__annotations__", {}):
            text = _comments_of(klass).get(name)
            if text:
                return _first_sentence(text)
    for kind in ((0, 1) if loose else (0,)):  # ``name: text`` in any docstring before a looser mention
        for klass in mro:
            text = _docstring_of(klass)[kind].get(name)
            if text:
                return text
    return ""


def _class_summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return _first_sentence(_plain(inspect.cleandoc(doc).split("\n\n")[0]))


def section_doc(cls: type, name: str, value: Any = None) -> str:
    """The one-line purpose of section ``name`` of ``cls``: its field doc (not a loose mention), else the
    first sentence of the section class's docstring, else a loose mention."""
    doc = field_doc(cls, name, loose=False)
    if not doc:
        section_cls = type(value) if _is_dc(value) else _field_types(cls).get(name)
        if isinstance(section_cls, type):
            doc = _class_summary(section_cls)
    return doc or field_doc(cls, name)


def _defaults_of(cfg: Any) -> Any:
    """``type(cfg)()`` (the class's own defaults), or None when it needs arguments."""
    try:
        return type(cfg)()
    except Exception:
        return None


def describe(cfg: Any, prefix: str = "", *, _defaults: Any = _NO_DEFAULT) -> list[KeyDoc]:
    """Every leaf of config ``cfg`` as ``KeyDoc(key, value, default, doc)``, depth first in field order.

    ``default`` is the value at the same key in ``type(cfg)()`` (the config class's defaults; a section
    of another type falls back to its own class's defaults; ``MISSING`` when there is none); ``doc`` is
    :func:`field_doc`. An algorithm section's traced hyper-parameters are listed under its ``hparams``
    section (``ppo.hparams.kl_coef``; ``ppo.kl_coef`` is accepted as an override too)."""
    if not _is_dc(cfg):
        raise ConfigError(f"describe: expected a config dataclass, got {type(cfg).__name__}")
    defaults = _defaults_of(cfg) if _defaults is _NO_DEFAULT or type(_defaults) is not type(cfg) else _defaults
    cls = type(cfg)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        key = prefix + f.name
        if _is_dc(value):
            out.extend(describe(value, key + ".", _defaults=default))
        else:
            out.append(KeyDoc(key, value, default, field_doc(cls, f.name)))
    return out


def config_sections(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted section key, one-line purpose)`` of every section of ``cfg`` (a config instance or
    class), nested ones included (``ppo.hparams``)."""
    if isinstance(cfg, type):
        cfg = cfg()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_dc(value):
            doc = section_doc(type(cfg), f.name, value)
            if f.name == HPARAMS:
                doc = (doc + "; " if doc else "") + f"also settable as {prefix}KEY"
            out.append((prefix + f.name, doc))
            out.extend(config_sections(value, prefix + f.name + "."))
    return out


def format_value(value: Any) -> str:
    """A value as it would be written on the command line (``true``, ``none``, ``"text"``, ``(1, 2)``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def format_config(cfg: Any) -> str:
    """The resolved config as text, one ``key = value  # doc (default: X)`` line per leaf, grouped by
    section (a ``# [section] purpose`` line before each); what ``--print-config`` prints."""
    sections = dict(config_sections(cfg))
    lines = [f"# {type(cfg).__name__}: every key; override any as KEY=VALUE "
             "(an algorithm's hyper-parameters also as <algo>.KEY, e.g. ppo.kl_coef=0.1)"]
    shown: set[str] = set()
    for item in describe(cfg):
        parts = item.key.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            section = ".".join(parts[:i])
            if section not in shown:
                shown.add(section)
                lines += ["", f"# [{section}] {sections.get(section, '')}".rstrip()]
        note = (item.doc + " " if item.doc else "") + f"(default: {format_value(item.default)})"
        lines.append(f"{item.key} = {format_value(item.value)}  # {note}")
    return "\n".join(lines) + "\n"
