"""Name -> class registries that the library dispatches through and the CLI is generated from.

A method (a quantization method, a prune method) is a small class with a `help` line, its
constraints and its work as methods. It joins a registry with one decorator line, as a model joins
lm-evaluation-harness with `@register_model("name")`:

    @register_quant_method("rtn")
    class RoundToNearest(QuantMethod):
        help = "round-to-nearest in the block format"

The library looks the class up by the name the user typed (`create`), so no code anywhere
branches on a method's name; `slimlm quantize --help` and `--method`'s accepted values are read
from the same dict (`describe`, `names`), so the CLI cannot drift from what the library runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from slimlm.errors import SlimlmError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """{name: class}, in registration order (the order `--help` lists them in)."""

    def __init__(self, what: str, base: type[T]):
        super().__init__()
        self.what, self.base = what, base

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: file the class under `name` and set its `name` attribute."""
        def add(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"a {self.what} must subclass {self.base.__name__}, got {cls!r}")
            if name in self and self[name] is not cls:
                raise ValueError(f"{self.what} '{name}' is already registered ({self[name].__qualname__})")
            if not getattr(cls, "help", ""):
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
            raise SlimlmError(f"unknown method '{name}': choose one of {', '.join(self)}")
        return self[name]()

    def names(self) -> list[str]:
        return list(self)

    def describe(self) -> str:
        """'name: help; name: help; ...' for a CLI option's help text."""
        return "; ".join(f"{name}: {cls.help}" for name, cls in self.items())
