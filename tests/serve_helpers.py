"""Starting a real `moecli serve` for tests: a subprocess of the CLI on 127.0.0.1 with --port 0 (the kernel picks a
free port; the server prints its URL), stopped by SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, *args: str, timeout: float = 180.0, env: dict | None = None):
        e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                 PYTHONUNBUFFERED="1")
        e.pop("MOECLI_API_KEY", None)
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "moecli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
        self.stderr: list[str] = []
        self._err = threading.Thread(target=self._drain_err, daemon=True)
        self._err.start()
        self.url = self._wait_url(timeout)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _drain_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    time.sleep(0.2)
                    raise RuntimeError(f"server exited {self.proc.returncode}: {''.join(self.stderr)}")
                continue
            m = re.search(r" on (http://[^\s]+) ", line)
            if m:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return m.group(1)
        self.stop()
        raise RuntimeError("server did not start in time")

    def err_text(self) -> str:
        """Everything the server wrote on stderr (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self._err.join(5)
        return "".join(self.stderr)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
