"""The `moecli` console script: one Typer app, one module per command, errors as one line."""
from __future__ import annotations

import os
import sys

import click
import typer

# Typer >= 0.29 vendors its own copy of click: catch its exception classes as well as click's.
_EXIT, _ABORT, _USAGE = [click.exceptions.Exit], [click.exceptions.Abort], [click.ClickException]
try:
    from typer import exceptions as _typer_exc
    from typer._click import exceptions as _typer_click

    _EXIT.append(_typer_exc.Exit)
    _ABORT.append(_typer_exc.Abort)
    _USAGE.append(_typer_click.ClickException)
except (ImportError, AttributeError):  # pragma: no cover - older Typer uses click's classes
    pass
_EXIT, _ABORT, _USAGE = tuple(_EXIT), tuple(_ABORT), tuple(_USAGE)

from moecli.errors import MoecliError

app = typer.Typer(
    name="moecli",
    help="Run large Mixture-of-Experts LLMs on one machine: experts on CPU and GPU, scheduled per layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each command module exposes `register(app)`; importing them here keeps startup in one place.
    from moecli.cli import bench, chat, profile, pull, serve

    for module in (pull, profile, chat, bench, serve):
        module.register(app)


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        rc = app(args=argv, standalone_mode=False)  # non-standalone click returns Exit codes instead of exiting
        if isinstance(rc, int) and rc:
            raise SystemExit(rc)
    except MoecliError as e:
        fail(str(e))
    except _EXIT as e:
        raise SystemExit(e.exit_code)
    except _ABORT:
        fail("aborted", 130)
    except _USAGE as e:
        e.show()
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as e:
        # Disk full, read-only file system, permission denied...: the OS message says it best.
        fail(f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""))
    except Exception as e:  # noqa: BLE001 - last line of defence: one line unless debugging
        if os.environ.get("MOECLI_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e} (set MOECLI_DEBUG=1 for a traceback)", 2)


if __name__ == "__main__":
    main(sys.argv[1:])
