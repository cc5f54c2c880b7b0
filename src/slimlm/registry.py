"""Name -> class registries that the library dispatches through and the CLI is generated from.

Every pluggable method of slimlm (a quantization method, a prune method, an eval task kind, a
routing policy) is a small class with a `help` line, its constraints and its work as methods. It
joins its registry with one decorator line, as a model joins lm-evaluation-harness with
`@register_model("name")`:

    @register_quant_method("rtn")
    class RoundToNearest(QuantMethod):
        help = "round-to-nearest in the block format"

The library looks the class up by the name the user typed (`create`), so no code anywhere
branches on a method's name; `--help` and an option's accepted values are read from the same dict
(`describe`, `helps`), so the CLI cannot drift from what the library runs. One class serves every
registry (it sits below all layers), so the rules for registering are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from slimlm.errors import SlimlmError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """{name: class}, in registration order (the order `--help` lists them in).

    `what` names an entry in registration errors ("quantization method"); `unknown` names it in
    the user's error for a name that is not there ("unknown method 'x': choose one of ...")."""

    def __init__(self, what: str, base: type[T], unknown: str | None = None):
        super().__init__()
        self.what, self.base, self.unknown = what, base, unknown or what
        self.helps: Mapping[str, str] = _Helps(self)

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: file the class under `name` and set its `name` attribute. A second,
        different class under a taken name is an error, so a plugin cannot silently replace a
        built-in (the same class again, e.g. a reloaded module, is fine)."""
        def add(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"a {self.what} must subclass {self.base.__name__}, got {cls!r}")
            taken = self.get(name)
            if taken is not None and taken.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.what} '{name}' is already registered ({taken.__qualname__})")
            if not getattr(cls, "help", "").strip():
                raise ValueError(f"{self.what} '{name}' needs a `help` line (the CLI shows it)")
            cls.name = name
            self[name] = cls
            return cls
        return add

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a method of their own undo it with this)."""
        self.pop(name, None)

    def create(self, name: str) -> T:
        """A fresh instance of the class filed under `name`; an unknown name is the user's error."""
        if name not in self:
            raise SlimlmError(f"unknown {self.unknown} '{name}': choose one of {', '.join(self)}")
        return self[name]()

    def names(self) -> list[str]:
        return list(self)

    def describe(self) -> str:
        """'name: help; name: help; ...' for a CLI option's help text."""
        return "; ".join(f"{name}: {cls.help}" for name, cls in self.items())


class _Helps(Mapping):
    """name -> help line of every registered class, read live (a class registered later shows)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> str:
        return self._registry[name].help

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._registry))

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return repr(dict(self))
