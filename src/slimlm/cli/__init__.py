"""The `slimlm` command: parses arguments, calls the library, prints. No logic of its own.

Errors the user can fix (SlimlmError) print one line on stderr and exit 1; --debug shows the
traceback. The list of verbs is data (VERBS) so tests can check it against the real CLI. Each
verb group is one module here; importing it registers its commands on `app` (cli/app.py).
"""

from __future__ import annotations

import sys

import typer

from slimlm.cli import compress, curate, distill, ledger, models, moe, prune, router, serve, shrink, train  # noqa: F401 - register
from slimlm.cli import eval as eval_verbs  # noqa: F401 - registers eval, bench, compare, report
from slimlm.cli.app import VERBS, app
from slimlm.errors import SlimlmError

__all__ = ["VERBS", "app", "main"]

# `--help` lists the verbs in VERBS order (the workflow's), not in the order their modules loaded.
app.registered_commands.sort(key=lambda c: VERBS.index(c.name or c.callback.__name__))


def main() -> None:
    from slimlm.runs import set_runs_db

    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except SlimlmError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)  # one line, never wrapped
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors and unexpected failures
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    finally:
        set_runs_db(None)  # --runs-db applies to this invocation only


if __name__ == "__main__":
    main()
