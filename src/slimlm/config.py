"""Settings as data: YAML recipes (or plain dicts) loaded strictly into dataclasses.

`finetune` and `distill` each take one config dataclass; the CLI builds it, a YAML recipe holds it
(`--config FILE.yaml`) and the run records it. A typo in a recipe must never train silently with a
default instead, so loading is strict: an unknown key is an error naming the key, its section and
the keys allowed there, and a value of the wrong type (a string where a number belongs) names the
key, the type expected and the value given. Both are one-line `SlimlmError`s, which the CLI prints
without a traceback.

A nested dataclass field is a section (a YAML mapping); a section starts from the field's default,
so a recipe names only what it changes. YAML 1.1, which PyYAML speaks, reads `2e-4` as a string;
recipes use the YAML 1.2 float syntax, so `lr: 2e-4` is read as the number it looks like.

`replace_checked` is the same check for Python keyword overrides (`finetune(..., rank=8)`): there an
unknown name or a wrong type is a programming error, so it raises TypeError as Python does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slimlm.errors import SlimlmError

T = TypeVar("T")


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (`1e-4`, `3E+2`) as floats, and
    refuses a key given twice in one mapping (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # not a setting's name: _build reports it as an unknown key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))


def load_config(cls: type[T], source: str | os.PathLike | Mapping) -> T:
    """An instance of the dataclass `cls` from a YAML file (path) or a mapping, checked strictly.

    Keys a recipe leaves out keep their defaults; `validate()` (if the class has one) is left to the
    caller, which may still apply command-line overrides first."""
    if isinstance(source, Mapping):
        return _build(cls, source, "config", "", None)
    path = Path(source)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SlimlmError(f"config file {path} not found: give the path of a YAML recipe") from None
    except UnicodeDecodeError:
        raise SlimlmError(f"config file {path} is not text: give a YAML file") from None
    except OSError as exc:
        raise SlimlmError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__}): give a YAML "
                          "file") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SlimlmError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SlimlmError(f"{path}: a recipe is a mapping of settings (key: value lines), not {_describe(data)}")
    return _build(cls, data, str(path), "", None)


def replace_checked(config: T, where: str = "config", **changes) -> T:
    """`dataclasses.replace` that checks each name against the fields and each value against the
    field's type, raising TypeError naming the allowed names. A mapping for a nested dataclass field
    changes only the keys it names."""
    try:
        return _build(type(config), changes, where, "", config)
    except SlimlmError as exc:
        raise TypeError(str(exc)) from None


def make_config(cls: type[T], config=None, where: str = "config", **overrides) -> T:
    """The config a library verb runs with: `config` (an instance of `cls`, a YAML path or a mapping;
    None: the defaults) with the keyword `overrides` applied, each checked as `replace_checked` does."""
    if config is None:
        config = cls()
    elif isinstance(config, (str, os.PathLike, Mapping)):
        config = load_config(cls, config)
    elif not isinstance(config, cls):
        raise TypeError(f"{where}: config must be a {cls.__name__}, a YAML path or a mapping, not a "
                        f"{type(config).__name__}")
    return replace_checked(config, where, **overrides) if overrides else config


def fields_of(cls) -> list[str]:
    """The keys a recipe may give for `cls`: its init fields, less those marked
    `field(metadata={"recipe": False})` (set by the verb, such as TrainConfig.out)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("recipe", True)]


def _build(cls, data: Mapping, where: str, section: str, base):
    """`cls` from `data`, starting from `base` (an instance) or the class defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name in fields_of(cls)}
    in_section = f"in section '{section}'" if section else "at the top level"
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise SlimlmError(f"{where}: unknown key {str(key)!r} {in_section}: allowed keys are "
                              f"{', '.join(sorted(fields))}")
        name = f"{section}.{key}" if section else key
        field = fields[key]
        nested_base = getattr(base, key) if base is not None else _default(field)
        values[key] = _convert(value, hints[key], where, name, nested_base)
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [n for n, f in fields.items() if n not in values and _default(f) is dataclasses.MISSING]
    if missing:
        raise SlimlmError(f"{where}: missing key {missing[0]!r} {in_section}: it has no default")
    return cls(**values)


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _convert(value, hint, where: str, name: str, nested_base):
    """`value` as the type `hint` asks for, or a SlimlmError naming the key, the type and the value."""
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            start = nested_base if isinstance(nested_base, hint) else None
            return _build(hint, value, where, name, start)
    elif _matches(value, hint):
        return _coerce(value, hint)
    raise SlimlmError(f"{where}: {name} must be {_expected(hint)}, not {_describe(value)}")


def _arms(hint) -> tuple:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def _matches(value, hint) -> bool:
    for arm in _arms(hint):
        origin = typing.get_origin(arm)
        if arm is Any:
            return True
        if arm is type(None):
            if value is None:
                return True
        elif arm is bool:
            if isinstance(value, bool):
                return True
        elif arm is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif arm is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif arm is Path:
            if isinstance(value, (str, os.PathLike)):
                return True
        elif origin in (list, tuple):
            (item,) = typing.get_args(arm)[:1] or (Any,)
            if isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value):
                return True
        elif origin is dict or arm is dict:
            if isinstance(value, Mapping):
                return True
        elif isinstance(arm, type) and isinstance(value, arm):
            return True
    return False


def _coerce(value, hint):
    """The value in the field's own type where the file's differs: 1 -> 1.0, 'a/b' -> Path('a/b')."""
    for arm in _arms(hint):
        if not _matches(value, arm):
            continue
        if arm is float:
            return float(value)
        if arm is Path:
            return Path(value)
        if typing.get_origin(arm) in (list, tuple):
            item = (typing.get_args(arm) or (Any,))[0]
            return typing.get_origin(arm)(_coerce(v, item) for v in value)
        return value
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
          type(None): "null", dict: "a mapping"}


def _expected(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a section (a mapping of {hint.__name__} settings)"
    names = []
    for arm in _arms(hint):
        if typing.get_origin(arm) in (list, tuple):
            item = (typing.get_args(arm) or (Any,))[0]
            names.append(f"a list of {_expected(item).removeprefix('a ').removeprefix('an ')}s")
        else:
            names.append(_NAMES.get(arm, getattr(arm, "__name__", str(arm))))
    return " or ".join(names)


def _describe(value) -> str:
    kind = {bool: "the boolean", int: "the integer", float: "the number", str: "the string", type(None): "null",
            list: "the list", dict: "the mapping"}.get(type(value), f"the {type(value).__name__}")
    return kind if value is None else f"{kind} {value!r}"
