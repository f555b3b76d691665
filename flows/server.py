"""One Prefect API for a whole stage run, its worker processes included.

With no `PREFECT_API_URL` configured, Prefect starts a temporary server per *process*:
a process pool would start one in every worker (~10 s each, and they time out when
several start at once on 2 cores). Starting one here and exporting its URL lets the
workers inherit it.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import prefect
from prefect.context import refresh_global_settings_context
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from alexnet.errors import AlexnetError, one_line
from alexnet.orphans import die_with_parent

STARTUP_TIMEOUT_S = 90  # Prefect's 20 s default is too short on a busy 2-core machine


# What Prefect runs as its temporary server (`SubprocessASGIServer` in
# prefect.server.api.server): its app under uvicorn, with the UI and the lasting
# server's services off. Started here rather than through that class: importing its
# module (the whole server: FastAPI, SQLAlchemy, the models) cost each stage ~5 s of
# CPU on a 2-core VM, for a server that runs in another process.
SERVER_APP = "prefect.server.api.server:create_app"
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
STOP_WAIT_S = 5  # then killed (Prefect's own wait)
STARTS, UVICORN_STARTUP_FAILURE = 3, 3


class TemporaryServer:
    """Prefect's temporary server, in a session of its own, on a socket bound here.

    A session of its own: a Ctrl-C at the terminal goes to every process of its
    foreground group: in the stage's group the server died with the stage, whose Prefect
    clients then retried the dead API for minutes before it could exit. Stopped at exit
    (`atexit`: after Prefect's own exit handlers, registered later, have sent the run's
    last logs), and by Linux when this process dies without it (a closed terminal,
    `timeout`): out of the group, no signal to the group reaches it.

    A socket bound here (a port the kernel picks, handed to uvicorn with `--fd`): Prefect
    picks a port that is free when it looks, and takes the first answer on it as its
    server's. Two stages starting at once could pick the same one; the second's server
    then failed to bind, and that stage used the first's, which went with the first stage."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.address = self.api_url = ""

    def start(self, timeout: float) -> None:
        """Start the server, and return once it answers (an error line after `timeout` s,
        or when it exits first). Started again when it fails to start (uvicorn's status 3),
        as Prefect does: two servers making one new database at once (two stages' first
        runs) race in its migrations, and one of them fails."""
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        for attempt in range(STARTS):
            self.process = self.launch()
            while (why := unreachable(self.api_url)) is not None:
                if self.process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise AlexnetError(
                        f"Prefect's temporary server did not answer in {timeout} s ({why})"
                    )
                time.sleep(0.1)
            else:
                return
            if self.process.returncode != UVICORN_STARTUP_FAILURE or attempt == STARTS - 1:
                raise AlexnetError(f"Prefect's temporary server exited ({self.process.returncode})")

    def launch(self) -> subprocess.Popen:
        """The server's process, started (not yet answering: `start` waits for it)."""
        listener = _bound(0)
        self.address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.api_url = f"{self.address}/api"
        get_logger().info(f"Starting temporary server on {self.address}")
        fd, app_dir = listener.fileno(), str(prefect.__module_path__.parent)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", SERVER_APP]
        command += ["--fd", str(fd), "--log-level", "error", "--lifespan", "on"]
        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        with listener:  # the server holds it now (closed with the server)
            process = subprocess.Popen(
                command,
                env={**os.environ, **SERVER_ENV, **settings},
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
                pass_fds=(fd,),
            )
        return process

    def stop(self) -> None:
        if self.process is None:
            return
        get_logger().info(f"Stopping temporary server on {self.address}")
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _bound(port: int) -> socket.socket:
    """A TCP socket bound to `port` on 127.0.0.1 (0: one the kernel picks), for the server.

    Not yet listening: until the server listens (asyncio does, once it serves), a
    connection is refused at once, which the startup check retries; a listening
    socket would accept it and leave it unanswered while the server imports (seconds),
    and the check failed on its read timeout. With TCP_NODELAY, which its connections
    inherit: uvicorn takes a socket it is handed for a Unix one, and asyncio sets the
    option only on TCP sockets, so each answer's body waited for the client's delayed
    acknowledgement (~40 ms an API call)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", port))
    return listener


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
    server = TemporaryServer()
    server.start(timeout=STARTUP_TIMEOUT_S)  # stopped at exit, after Prefect's logs drain
    with api_at(server.api_url):
        yield server.api_url


@contextmanager
def api_at(url: str) -> Iterator[None]:
    """Point this process, and the processes it starts, at the Prefect API `url`; undone
    on exit. In the environment, for the workers, and in Prefect's settings of the
    process as well as of this context: Prefect's own threads (the process pool's
    message forwarding, the log and event services) start outside the context and read
    the process's, made when Prefect was imported; with no API there, each started a
    temporary server of Prefect's own."""
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        refresh_global_settings_context()
