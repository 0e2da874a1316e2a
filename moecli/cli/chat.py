"""`moecli chat`."""
import typer

from moecli.errors import MoecliError


def chat() -> None:
    """Not available yet."""
    raise MoecliError("`moecli chat` is not available yet in this version")


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
