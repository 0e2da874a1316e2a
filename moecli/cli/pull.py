"""`moecli pull`."""
import typer

from moecli.errors import MoecliError


def pull() -> None:
    """Not available yet."""
    raise MoecliError("`moecli pull` is not available yet in this version")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
