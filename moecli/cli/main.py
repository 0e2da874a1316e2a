"""The `moecli` console script: one Typer app, one module per command, errors as one line."""
from __future__ import annotations

import os
import sys
from typing import Optional

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

PROG = "moecli"
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what llama.cpp's and ollama's binaries end with on a closed pipe

app = typer.Typer(
    name=PROG,
    help="Run large Mixture-of-Experts LLMs on one machine: experts on CPU and GPU, scheduled per layer.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def version_text() -> str:
    """moecli's version and the two engines' (read from package metadata: no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    from moecli import __version__

    parts = []
    for dist in ("llama-cpp-python", "torch"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"{PROG} {__version__} ({', '.join(parts)})"


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", "-V", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    """Run large Mixture-of-Experts LLMs on one machine: experts on CPU and GPU, scheduled per layer."""


def _register() -> None:
    # Each command module exposes `register(app)`; importing them here keeps startup in one place.
    from moecli.cli import bench, chat, doctor, profile, pull, serve

    for module in (pull, profile, chat, bench, serve, doctor):
        module.register(app)


def fail(message: str, code: int = 1) -> None:
    """Print one clear line on stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def usage_line(e) -> str:
    """A Click usage error as one line: its message and where the help is (never Click's framed box)."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else PROG
    return f"{message[:1].lower()}{message[1:]} (see `{where} --help`)"


def _closed_pipe() -> None:
    """The reader went away (`| head`): no message, and no second error when Python flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise SystemExit(SIGPIPE_STATUS)


def _raise_broken_pipe(self) -> None:
    raise BrokenPipeError


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    # Rich answers a closed pipe with SystemExit(1) (Typer's help and our tables print through it): hand it to the
    # one handler below instead, so every command ends the same way.
    Console.on_broken_pipe = _raise_broken_pipe
    _register()
    try:
        try:
            # non-standalone click returns Exit codes instead of exiting
            rc = app(args=argv, prog_name=PROG, standalone_mode=False)
            if isinstance(rc, int) and rc:
                raise SystemExit(rc)
            sys.stdout.flush()  # a closed pipe shows here for output still in the buffer
        except BrokenPipeError:
            _closed_pipe()
        except SystemExit as e:
            # Click meets a closed pipe inside a command with sys.exit(1), having wrapped stdout to hush it.
            if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
                _closed_pipe()
            raise
        except MoecliError as e:
            fail(str(e))
        except _EXIT as e:
            raise SystemExit(e.exit_code)
        except _ABORT:
            fail("aborted", 130)
        except _USAGE as e:
            fail(usage_line(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as e:
            # Disk full, read-only file system, permission denied...: the OS message says it best.
            fail(f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""))
        except Exception as e:  # noqa: BLE001 - last line of defence: one line unless debugging
            if os.environ.get("MOECLI_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set MOECLI_DEBUG=1 for a traceback)", 2)
    except BrokenPipeError:  # stderr closed too while reporting
        _closed_pipe()


if __name__ == "__main__":
    main(sys.argv[1:])
