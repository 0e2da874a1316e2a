"""`moecli ps`: GET /api/ps from a running `moecli serve` and a table of it (ollama's columns, plus where the experts
ran and the expert-cache hit rate)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from moecli.errors import MoecliError


def fetch_ps(host: str, port: int, api_key: str | None = None, timeout: float = 5.0) -> dict:
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/api/ps"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = json.loads(e.read().decode("utf-8", "replace")).get("error", "")
        except (ValueError, AttributeError):
            pass
        raise MoecliError(f"the server at {host}:{port} answered {e.code}"
                          f"{': ' + str(detail) if detail else ''}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MoecliError(f"no moecli server is running at {host}:{port} ({reason}): start one with "
                          "`moecli serve [MODEL]`") from None
    except ValueError:
        raise MoecliError(f"the server at {host}:{port} is not a moecli server (its /api/ps is not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise MoecliError(f"the server at {host}:{port} is not a moecli server")
    return data


def _gb(n) -> str:
    return f"{n / 1e9:.1f} GB" if isinstance(n, (int, float)) and n >= 1e8 else f"{(n or 0) / 1e6:.0f} MB"


def render_ps(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    models = data["models"]
    console = Console()
    if not models:
        console.print("no model loaded")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "SIZE", "PROCESSOR", "CACHE HIT", "CONTEXT", "SLOTS", "REQUESTS"):
        table.add_column(col, no_wrap=True)
    for m in models:
        experts = m.get("experts") or {}
        server = m.get("server") or {}
        hit = experts.get("cache_hit_rate")
        slots = f"{server.get('running', 0)} busy / {server.get('slots', '?')}"
        if server.get("queued"):
            slots += f", {server['queued']} queued"
        if server.get("batched") and server.get("decode_forwards"):  # streams decoded per forward pass so far
            slots += f", batch {server['decode_tokens'] / server['decode_forwards']:.1f}"
        table.add_row(str(m.get("name", "?")), _gb(m.get("size")), str(experts.get("placement", "?")),
                      f"{100 * hit:.1f}%" if isinstance(hit, (int, float)) else "-",
                      str(m.get("context_length", "?")), slots, str(server.get("requests", "-")))
    console.print(table)
