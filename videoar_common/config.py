"""Typed recipe configs: YAML files loaded into nested ``kw_only`` dataclasses.

Design decision: a recipe is data. Every knob is a dataclass field with a docstring under it and a
check in ``__post_init__``; YAML only fills those fields. There are no silent defaults for misspelt
keys: an unknown key or a value of the wrong type is an error naming the key path and the file (or
the ``--set`` override) it came from. One loader serves every stage.

A recipe may name a parent with ``base: other.yaml`` (relative to the recipe's own directory); the
child is deep-merged over the parent, and chains are allowed. ``--set a.b.c=value`` overrides are
applied last, with ``value`` parsed as YAML. The fully resolved config is written to the run
directory as ``config.yaml``, and loading that file gives back an equal config.

Every leaf value keeps its source (the file that set it last in the chain, or the ``--set`` item) while
the recipe is merged, so an error names, for each value it is about, where that value came from, not
where its section first appeared. ``load_config`` leaves that map on the config it returns
(:func:`value_source`), so later checks (a resume refusal) can say it too.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from videoar_common.exit_codes import InputError

T = TypeVar("T")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

BASE_KEY = "base"
RESOLVED_CONFIG_NAME = "config.yaml"


class ConfigError(InputError, ValueError):
    """A recipe or override is invalid; the message names the key path and its source."""


# ----------------------------------------------------------------------------------------------
# Reading recipe files (with `base:` chains) into one raw mapping plus per-key provenance.
# ----------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, child: dict, base_origin: dict, child_origin: dict, prefix: str = "") -> None:
    """Merge ``child`` into ``base`` in place; nested mappings merge, anything else replaces."""
    for key, value in child.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, base_origin, child_origin, prefix=f"{path}.")
        else:
            base[key] = copy.deepcopy(value)
            for p in [p for p in base_origin if p == path or p.startswith(path + ".")]:
                del base_origin[p]
            for p, src in child_origin.items():
                if p == path or p.startswith(path + "."):
                    base_origin[p] = src


def _record_origin(data: Any, source: str, prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}{key}"
            out[path] = source
            _record_origin(value, source, f"{path}.", out)
    return out


def read_recipe_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a recipe and its ``base:`` ancestors; returns (merged mapping, key path → source file)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe base chain has a cycle: {chain}")
    data = _read_yaml(path)
    base_name = data.pop(BASE_KEY, None)
    origin = _record_origin(data, str(path))
    if base_name is None:
        return data, origin
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name, got {base_name!r}")
    merged, merged_origin = read_recipe_chain(path.parent / base_name, (*_seen, path))
    _deep_merge(merged, data, merged_origin, origin)
    return merged, merged_origin


def apply_overrides(raw: dict, origin: dict[str, str], overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to ``raw`` in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key_path, text = item.split("=", 1)
        keys = key_path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty key in '{key_path}'")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(keys[:depth + 1])}' is not a section")
            node = child
        node[keys[-1]] = value
        _record_origin({key_path: value}, f"--set {item}", out=origin)
        for p in list(origin):
            if p.startswith(key_path + "."):
                origin[p] = f"--set {item}"


# ----------------------------------------------------------------------------------------------
# Building dataclasses from the raw mapping, with type checks.
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _where(path: str, origin: Mapping[str, str]) -> str:
    src = origin.get(path)
    while src is None and "." in path:
        path = path.rsplit(".", 1)[0]
        src = origin.get(path)
    return f" (from {src})" if src else ""


def _named_leaves(message: str, cls: type, prefix: str) -> list[str]:
    """Leaf key paths of the section ``cls`` at ``prefix`` that ``message`` names, in order of appearance:
    by full path (``parallel.tensor_parallel``) or, for the section's own fields, by bare name."""
    found = {}
    for path, *_ in iter_fields(cls, prefix):
        relative = path[len(prefix):]
        names = (path, relative) if "." not in relative else (path,)
        for name in names:
            m = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)
            if m:
                found[path] = min(found.get(path, m.start()), m.start())
    return sorted(found, key=found.get)


def _sources_of(message: str, cls: type, prefix: str, origin: Mapping[str, str]) -> str:
    """`` (a.b from FILE; a.c from --set a.c=1; a.d: default)`` for the values ``message`` names; else
    where the section came from."""
    named = _named_leaves(message, cls, prefix)
    if not named:
        section = prefix.rstrip(".")
        return _where(section, origin) if section else ""
    parts = [f"{path} from {origin[path]}" if path in origin else f"{path}: default" for path in named]
    return f" ({'; '.join(parts)})"


def _convert(value: Any, tp: Any, path: str, origin: Mapping[str, str]) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples etc."""
    where = _where(path, origin)
    typ_origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping of {tp.__name__} fields, got {value!r}{where}")
        return build_dataclass(tp, value, origin, prefix=f"{path}.")
    if typ_origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path, origin)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{path}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}{where}")
    if typ_origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            raise ConfigError(f"'{path}' must be one of {list(options)}, got {value!r}{where}")
        return value
    if typ_origin in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}{where}")
        args = typing.get_args(tp)
        if typ_origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{path}' must have {len(args)} items, got {len(value)}{where}")
            return tuple(_convert(v, a, f"{path}[{i}]", origin) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]", origin) for i, v in enumerate(value)]
        return tuple(items) if typ_origin is tuple else items
    if typ_origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}{where}")
        ktp, vtp = typing.get_args(tp) or (Any, Any)
        return {_convert(k, ktp, f"{path}.{k}", origin): _convert(v, vtp, f"{path}.{k}", origin)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' must be true or false, got {value!r}{where}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' must be an integer, got {value!r}{where}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{path}' must be a number, got {value!r}{where}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be a string, got {value!r}{where}")
        return value
    raise ConfigError(f"'{path}': unsupported config type {tp!r}")


def build_dataclass(cls: type[T], raw: Mapping[str, Any], origin: Mapping[str, str] | None = None,
                    prefix: str = "") -> T:
    """Build ``cls`` from a raw mapping; unknown keys and wrong types raise :class:`ConfigError`."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key '{path}'{_where(path, origin)}; "
                              f"{cls.__name__} accepts: {known}")
        kwargs[key] = _convert(value, hints[key], path, origin)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__ check; name where each value it names came from
        section = prefix.rstrip(".")
        label = f"'{section}': " if section else ""
        raise ConfigError(f"{label}{e}{_sources_of(str(e), cls, prefix, origin)}") from e


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a recipe file (``None``: the dataclass defaults) plus ``--set`` overrides."""
    raw, origin = read_recipe_chain(recipe) if recipe is not None else ({}, {})
    apply_overrides(raw, origin, overrides)
    cfg = build_dataclass(cls, raw, origin)
    # not a field: equality, config_to_dict and config.yaml ignore it; dataclasses.replace drops it
    object.__setattr__(cfg, _SOURCES_ATTR, dict(origin))
    return cfg


_SOURCES_ATTR = "_value_sources"


def value_source(cfg: Any, path: str) -> str | None:
    """The file or ``--set`` item that set the leaf ``path`` (``"model.hidden_size"``) of a config returned
    by :func:`load_config`; ``None`` for a value nobody set (a default or a derived value) or a config
    built another way."""
    return getattr(cfg, _SOURCES_ATTR, {}).get(path)


@dataclasses.dataclass(frozen=True)
class Change:
    """One leaf that differs between a saved config and this run's."""

    path: str
    before: Any
    after: Any
    derived: bool
    """This run's value is what the config fills in by itself (a default, or derived from other knobs,
    e.g. ffn_hidden_size = 4 x hidden_size when unset): it follows from the changes that are not."""
    source: str | None
    """Where this run's value was set (:func:`value_source`), when known."""

    def describe(self, saved_name: str = "the checkpoint") -> str:
        origin = f" (from {self.source})" if self.source else ""
        return f"{self.path}: {self.before!r} in {saved_name}, {self.after!r} now{origin}"


def _fills_itself(section: Any, name: str) -> bool:
    """Would ``section`` hold the same ``name`` if that field were left at its declared default?"""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return False
    try:
        again = dataclasses.replace(section, **{name: default})
    except (TypeError, ValueError):  # the section needs this value (e.g. size=custom needs hidden_size)
        return False
    return config_to_dict(getattr(again, name)) == config_to_dict(getattr(section, name))


def config_changes(saved: Mapping[str, Any], cfg: Any, prefix: str = "", *, sources: Any = None,
                   skip: Sequence[str] = ()) -> list[Change]:
    """Leaves of the config dataclass ``cfg`` (a section whose key path starts with ``prefix``, e.g.
    ``"model."``) that differ from ``saved`` (its :func:`config_to_dict` form, e.g. from a checkpoint).
    The knobs this run sets come first, then the values that follow from them (:attr:`Change.derived`),
    each group in key order, so a message can name the knob the user changed. ``sources`` is the loaded
    config whose :func:`value_source` fills :attr:`Change.source`: by default ``cfg`` itself (keys
    relative to it), or the top-level config ``cfg`` belongs to (keys including ``prefix``); ``skip``
    names top-level fields of ``cfg`` to leave out."""
    sources = cfg if sources is None else sources
    changes: list[Change] = []

    def walk(section: Any, before: Mapping[str, Any], path: str) -> None:
        for f in dataclasses.fields(section):
            if not f.init or (section is cfg and f.name in skip):
                continue
            value, old = getattr(section, f.name), before.get(f.name) if isinstance(before, Mapping) else None
            key = f"{path}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, old if isinstance(old, Mapping) else {}, f"{key}.")
            elif config_to_dict(value) != old:
                lookup = key[len(prefix):] if sources is cfg else key  # sources' own key paths
                changes.append(Change(key, old, config_to_dict(value), _fills_itself(section, f.name),
                                      value_source(sources, lookup)))

    walk(cfg, saved, prefix)
    return sorted(changes, key=lambda c: (c.derived, c.path))


def describe_changes(changes: Sequence[Change], saved_name: str = "the checkpoint") -> str:
    """``a.b: 1 in the checkpoint, 2 now (from --set a.b=2); following from it: a.c (4 -> 8)``."""
    head = [c for c in changes if not c.derived] or list(changes)
    rest = [c for c in changes if c not in head]
    text = "; ".join(c.describe(saved_name) for c in head)
    if rest:
        text += "; following from it: " + ", ".join(f"{c.path} ({c.before!r} -> {c.after!r})" for c in rest)
    return text


# ----------------------------------------------------------------------------------------------
# Writing configs back out, and reading field docstrings (for --help and the recipes reference).
# ----------------------------------------------------------------------------------------------

def config_to_dict(cfg: Any) -> dict:
    """Plain-YAML-safe dict of a config dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_resolved_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically; returns the path."""
    from videoar_common.atomic import atomic_write_text
    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    atomic_write_text(path, dump_config(cfg))
    return path


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each field of a dataclass (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def iter_fields(cls: type, prefix: str = ""):
    """Yield (key path, type, default, doc) for every leaf field of a nested config dataclass."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield f"{prefix}{f.name}", tp, default, docs.get(f.name, "")
