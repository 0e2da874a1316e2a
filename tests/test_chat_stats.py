"""`chat -v`'s expert line: hit rate, CPU/device split, and the hot path's syncs and launches per token, from the
hybrid executor's own counters (a real chat on a tiny model)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny_gguf
from moecli.chat import stats as st

ROOT = Path(__file__).resolve().parents[1]


class _Model:
    device, engine = type("Cuda", (), {"type": "cuda"})(), "hybrid"

    def __init__(self, stats):
        self.stats = stats


def test_syncs_and_launches_per_token_between_snapshots():
    before = {"active": 10, "hits": 5, "cpu_experts": 6, "device_experts": 4, "syncs": 40, "launches": 16, "calls": 4}
    after = {"active": 30, "hits": 15, "cpu_experts": 16, "device_experts": 14, "syncs": 100, "launches": 56,
             "calls": 14}
    assert st.format_experts(_Model(after), before) == ("expert cache hit rate 50.0% | 50%/50% CPU/GPU | "
                                                        "6.0 syncs, 4.0 launches per token")
    assert st.snapshot(_Model(after)) == after  # the counters a later line is measured from


def test_chat_verbose_prints_them_from_the_executor():
    r = subprocess.run([sys.executable, "-m", "moecli", "chat", str(tiny_gguf("qwen3moe", "Q8_0")), "--device", "cpu",
                        "--placement", "lru", "--expert-slots", "4", "-p", "hello", "-n", "4", "--temp", "0", "-v"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"expert cache hit rate [\d.]+% \| .* \| ([\d.]+) syncs, ([\d.]+) launches per token", r.stderr)
    assert m, r.stderr
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
