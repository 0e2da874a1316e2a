"""`moecli bench --serve`: the load generator against a real `moecli serve` (the tiny model, two concurrency levels,
every request making exactly its n tokens because end-of-generation tokens are banned), as JSON."""
import json
import subprocess
import sys

from conftest import tiny_gguf
from serve_helpers import ROOT


def test_bench_serve_json():
    run = subprocess.run([sys.executable, "-m", "moecli", "bench", "--serve", str(tiny_gguf("qwen3moe", "Q8_0")),
                          "--streams", "1,2", "-n", "4", "-p", "16", "--requests", "1", "-r", "1", "-t", "1",
                          "-o", "json"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    rows = {r["streams"]: r for r in out["rows"]}
    assert set(rows) == {1, 2} and rows[1]["tokens"] == 4 and rows[2]["tokens"] == 8
    assert all(r["server"] == "moecli" and r["tok_s"] > 0 for r in rows.values())
    # streams per decode forward: 1 alone; two streams overlap for most of their tokens (timing decides how many)
    assert rows[1]["decode_batch"] == 1 and 1 <= rows[2]["decode_batch"] <= 2
    assert out["ttft"]["moecli"]["fresh_s"] > 0 and out["ttft"]["moecli"]["cached_prefix_s"] > 0
