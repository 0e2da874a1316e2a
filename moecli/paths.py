"""Where moecli keeps its files: per-user directories (platformdirs), never the current directory.

  profiles   $MOECLI_PROFILES, else the user config dir (~/.config/moecli/profiles on Linux): what `moecli
             profile` writes and chat/bench read; the reference hosts ship inside the package (moecli/profiles)
  cache      $MOECLI_CACHE, else the user cache dir (~/.cache/moecli): synthetic models, partial-pull notes
  traces     $MOECLI_TRACES, else the user data dir (~/.local/share/moecli/traces): routing traces
             (`moecli chat --record-trace FILE`) that `bench --simulate` finds without `--trace`
Models themselves live in the Hugging Face cache (moecli.hub.cache_dir), shared with other tools.
"""
from __future__ import annotations

import os
from pathlib import Path

APP = "moecli"


def _env_or(var: str, default) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else Path(default())


def profiles_dir() -> Path:
    from platformdirs import user_config_dir

    return _env_or("MOECLI_PROFILES", lambda: Path(user_config_dir(APP)) / "profiles")


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return _env_or("MOECLI_CACHE", lambda: user_cache_dir(APP))


def traces_dir() -> Path:
    from platformdirs import user_data_dir

    return _env_or("MOECLI_TRACES", lambda: Path(user_data_dir(APP)) / "traces")


def reference_profiles_dir() -> Path:
    """The reference host profiles shipped as package data (derived from published specs)."""
    return Path(__file__).resolve().parent / "profiles"
