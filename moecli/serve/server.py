"""Running the app under uvicorn: the port bound before the model loads (a busy port is one error line at once),
Ctrl-C / SIGTERM ending every queued and running request with an error event before uvicorn closes the connections,
and the port freed on exit."""
from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import sys
import threading
from typing import Callable

import sse_starlette.sse  # noqa: F401 - patches uvicorn's exit handler; ours (below) runs first
import uvicorn

from moecli.errors import MoecliError

GRACEFUL_S = 10  # after this, uvicorn drops the connections still open


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (port in use, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MoecliError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = " (another server is using it: pick another with --port)" if e.errno in (98, 48) else ""
        raise MoecliError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame):
        self._on_exit()  # the engine fails its jobs: each stream sends its error event and ends
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signal again once stopped: a stop on request exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app, engine, sock: socket.socket, verbose: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=GRACEFUL_S, lifespan="off", server_header=False)
    server = _Server(config, lambda: engine.stop("the server is shutting down"))
    engine.start()
    if on_ready:
        on_ready()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop("the server is shutting down")
        engine.join(GRACEFUL_S)
        sock.close()
    if server.started is False and not server.should_exit:
        raise MoecliError("the server could not start")
    sys.stdout.flush()
