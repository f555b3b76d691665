"""One Prefect API for a whole stage run, its worker processes included.

With no `PREFECT_API_URL` configured, Prefect starts a temporary server per *process*:
a process pool would start one in every worker (~10 s each, and they time out when
several start at once on 2 cores). Starting one here and exporting its URL lets the
workers inherit it.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import httpx
from prefect.settings import PREFECT_API_URL, temporary_settings

from alexnet.errors import AlexnetError, one_line
from alexnet.orphans import die_with_parent

STARTUP_TIMEOUT_S = 90  # Prefect's 20 s default is too short on a busy 2-core machine


def _own_session_server():
    """Prefect's temporary server, started in a session of its own, on a socket bound here.

    A session of its own: a Ctrl-C at the terminal goes to every process of its
    foreground group: in the stage's group the server died with the stage, whose Prefect
    clients then retried the dead API for minutes before it could exit. Stopped at exit as
    before (`atexit`), and by Linux when this process dies without it (a closed terminal,
    `timeout`): out of the group, no signal to the group reaches it.

    A socket bound here (a port the kernel picks, handed to uvicorn with `--fd`): Prefect
    picks a port that is free when it looks, and takes the first answer on it as its
    server's. Two stages starting at once could pick the same one; the second's server
    then failed to bind, and that stage used the first's, which went with the first stage.

    Prefect imported here: every command loads this module."""
    from prefect.server.api.server import SubprocessASGIServer

    class OwnSessionServer(SubprocessASGIServer):
        listener: socket.socket | None = None

        def find_available_port(self) -> int:
            self.listener = _bound(0)
            return self.listener.getsockname()[1]

        def _run_uvicorn_command(self) -> subprocess.Popen:
            if self.listener is None:  # a start again, after one that failed
                self.port = self.find_available_port()
            fd = self.listener.fileno()
            stage = functools.partial(_die_with_parent, os.getpid())
            real = subprocess.Popen  # (patched below, for Prefect's call)

            def popen(args: list[str], **kwargs) -> subprocess.Popen:
                args = _on_fd(args, self.port, fd)
                return real(
                    args, start_new_session=True, preexec_fn=stage, pass_fds=(fd,), **kwargs
                )

            try:
                with mock.patch.object(subprocess, "Popen", popen):  # Prefect's, 3 more args
                    return super()._run_uvicorn_command()
            finally:  # the server holds it now (closed with the server), or failed to start
                self.listener.close()
                self.listener = None

    return OwnSessionServer()  # Prefect's own singleton: its clients reuse it


def _bound(port: int) -> socket.socket:
    """A TCP socket bound to `port` on 127.0.0.1 (0: one the kernel picks), for the server.

    Not yet listening: until the server listens (asyncio does, once it serves), a
    connection is refused at once, which Prefect's startup check retries; a listening
    socket would accept it and leave it unanswered while the server imports (seconds),
    and the check failed on its read timeout. With TCP_NODELAY, which its connections
    inherit: uvicorn takes a socket it is handed for a Unix one, and asyncio sets the
    option only on TCP sockets, so each answer's body waited for the client's delayed
    acknowledgement (~40 ms an API call)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    return listener


def _on_fd(args: list[str], port: int, fd: int) -> list[str]:
    """uvicorn's command `args` serving the socket `fd` instead of binding `port`."""
    address = ["--host", "127.0.0.1", "--port", str(port)]
    at = next((i for i in range(len(args)) if args[i : i + 4] == address), None)
    if at is None:  # a Prefect whose command changed: fail here, not with a port clash
        raise AlexnetError(f"Prefect's server command has no {' '.join(address)}: {args}")
    return [*args[:at], "--fd", str(fd), *args[at + 4 :]]


def _die_with_parent(stage: int) -> None:
    """In the server's process before it runs: SIGTERM when the stage dies."""
    if not die_with_parent(signal.SIGTERM, stage):
        os._exit(1)


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why nothing answers at the Prefect API `url`, or None when something does (any
    HTTP answer counts: Prefect Cloud asks for a key)."""
    try:  # whether anything answers: no certificate check (Prefect's own may differ)
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, verify=False)
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        return one_line(error)
    return None


def check_api(url: str, timeout: float = 10.0, temporary: bool = True) -> None:
    """One line when `PREFECT_API_URL` names a server that does not answer (a `prefect
    server start` stopped or never started): Prefect's own failure comes after its
    retries, as a page of traceback. `temporary`: whether a temporary server would do
    (a stage's run; not `serve`'s)."""
    if why := unreachable(url, timeout):
        instead = ", or unset PREFECT_API_URL for a temporary one" if temporary else ""
        raise AlexnetError(
            f"PREFECT_API_URL: no Prefect server answers at {url} ({why}); "
            f"start it (`prefect server start`){instead}"
        )


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the API URL in use (checked), starting a temporary local server when none is
    set."""
    configured = PREFECT_API_URL.value()
    if configured:
        check_api(configured)
        yield configured
        return
    # No network here: the server's telemetry would only log a failure.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = _own_session_server()
    server.start(timeout=STARTUP_TIMEOUT_S)  # stopped by Prefect at exit, after logs drain
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
