"""KV slots of the server: a few sequences' caches (api.Session or a multi-sequence engine's equivalent), allocated
on first use and kept after a request ends, so a request that extends an earlier conversation reuses its prefix.

Choosing a slot for a prompt (as llama-server's slot similarity): an idle slot whose cached tokens are mostly a prefix
of the prompt (little to throw away); else a slot never used; else the idle slot sharing the longest prefix, the
least recently used among equals.
"""
from __future__ import annotations

import time
from typing import Callable

from moecli.api import common_prefix

SIMILARITY = 0.5  # share of a slot's cached tokens the prompt must keep for the slot to be taken first


class SlotPool:
    def __init__(self, new_slot: Callable[[], object], size: int):
        self._new = new_slot
        self.size = size
        self._slots: list = []
        self._busy: set[int] = set()
        self._used: dict[int, float] = {}

    @property
    def allocated(self) -> int:
        return len(self._slots)

    def check_memory(self) -> None:
        """Allocate the first slot now and refuse at start when all of them could not fit in the free RAM (a slot
        holds a whole context's KV cache; the others are allocated on first use)."""
        import psutil

        from moecli.errors import MoecliError

        if not self._slots:
            self._slots.append(self._new())
        per = getattr(getattr(self._slots[0], "cache", None), "nbytes", 0)
        more = per * (self.size - len(self._slots))
        free = psutil.virtual_memory().available
        if more > 0.9 * free:
            gib = 1 << 30
            raise MoecliError(f"{self.size} KV slots need {per * self.size / gib:.1f} GiB ({per / gib:.2f} GiB "
                              f"each) and {free / gib:.1f} GiB of memory is free: lower -np or --ctx")

    def cached_tokens(self) -> list[int]:
        return [s.cached for s in self._slots]

    def acquire(self, prompt: list[int]):
        """(slot, tokens still to compute) for `prompt`, or None when every slot is busy."""
        idle = [i for i in range(len(self._slots)) if i not in self._busy]
        scored = [(common_prefix(self._slots[i].tokens, prompt), i) for i in idle]
        similar = [(c, i) for c, i in scored if c > 0 and c >= SIMILARITY * self._slots[i].cached]
        if similar:
            i = max(similar, key=lambda ci: (ci[0], -self._used.get(ci[1], 0.0)))[1]
        elif len(self._slots) < self.size:
            self._slots.append(self._new())
            i = len(self._slots) - 1
        elif scored:
            i = max(scored, key=lambda ci: (ci[0], -self._used.get(ci[1], 0.0)))[1]
        else:
            return None
        self._busy.add(i)
        slot = self._slots[i]
        return slot, slot.reuse(prompt)

    def release(self, slot, keep: bool = True) -> None:
        i = next(i for i, s in enumerate(self._slots) if s is slot)
        if not keep:
            slot.reset()
        self._busy.discard(i)
        self._used[i] = time.monotonic()
