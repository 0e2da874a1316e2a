"""Silence llama.cpp's logging (it prints to stderr on every load) unless MOECLI_LLAMA_LOG is set."""
from __future__ import annotations

import os

_callback = None  # keep a reference: llama.cpp calls it from C


def quiet_llama() -> None:
    global _callback
    if _callback is not None or os.environ.get("MOECLI_LLAMA_LOG"):
        return
    import llama_cpp as L

    _callback = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(_callback, None)
