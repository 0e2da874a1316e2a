"""`moecli profile`."""
import typer

from moecli.errors import MoecliError


def profile() -> None:
    """Not available yet."""
    raise MoecliError("`moecli profile` is not available yet in this version")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
