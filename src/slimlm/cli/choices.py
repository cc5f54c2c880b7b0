"""`--method`-style options whose values are a registry's names, read each time the CLI runs.

A choice list fixed when the option is declared (at import) would refuse a method registered
later (a plugin, or a test's own method) and leave it out of `--help`. typer builds the click
command from each option's declaration on every run, so `registry_option` returns a declaration
whose help (each name with its help line) is read from the registry at that moment, and whose
parser checks the name against it: an unknown name fails with the library's own one-line error
(exit 1), exactly as when the library did the checking.
"""

from __future__ import annotations

from typer.core import TyperGroup
from typer.models import OptionInfo

__all__ = ["default_command_group", "live_help_option", "registry_option"]


def default_command_group(default: str) -> type[TyperGroup]:
    """A typer group class whose first argument, when it is not one of its subcommands, starts
    `default` (so `slimlm curate RECIPE ...` runs `curate run`, and `slimlm ledger --since 1h`
    runs `ledger summary`). With no arguments it runs `default` too, unless the group shows its
    help then (no_args_is_help)."""

    class DefaultCommandGroup(TyperGroup):
        def parse_args(self, ctx, args):
            if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
                args = [default, *args]
            elif not args and not self.no_args_is_help:
                args = [default]
            return super().parse_args(ctx, args)

    return DefaultCommandGroup


class _RegistryOptionInfo(OptionInfo):
    """typer's OptionInfo with `help` computed from the registry on each read."""

    def __init__(self, registry, **kwargs):
        self.registry = registry
        super().__init__(**kwargs)

    @property
    def help(self) -> str:
        return self.registry.describe()

    @help.setter
    def help(self, value) -> None:  # typer's constructor assigns it; the registry is the source
        pass


def registry_option(registry, default: str, *param_decls: str):
    """A typer option taking one name of `registry` (a slimlm.registry.Registry or alike: a
    dict of name -> class, with `describe()` and a `create(name)` that raises SlimlmError for an
    unknown name)."""
    def parse(value: str) -> str:
        if value not in registry:
            registry.create(value)  # raises: unknown method '...': choose one of ...
        return value

    return _RegistryOptionInfo(registry, default=default, param_decls=param_decls, parser=parse,
                               autocompletion=lambda incomplete: [n for n in registry if n.startswith(incomplete)])


def live_help_option(describe, default, *param_decls: str, **kwargs):
    """A typer option whose help is `describe()`, read on each run, and whose value the library
    checks with its own errors: for values that are not bare registry names (`--task
    perplexity:SOURCE`, eval's task kinds) or whose errors depend on other options (`--policy`)."""
    from types import SimpleNamespace

    return _RegistryOptionInfo(SimpleNamespace(describe=describe), default=default, param_decls=param_decls,
                               **kwargs)
