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
    """Prefect's temporary server, started in a session of its own. A Ctrl-C at the
    terminal goes to every process of its foreground group: in the stage's group the
    server died with the stage, whose Prefect clients then retried the dead API for
    minutes before it could exit. Stopped at exit as before (`atexit`), and by Linux when
    this process dies without it (a closed terminal, `timeout`): out of the group, no
    signal to the group reaches it. Imported here: every command loads this module."""
    from prefect.server.api.server import SubprocessASGIServer

    class OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            stage = functools.partial(_die_with_parent, os.getpid())
            popen = functools.partial(subprocess.Popen, start_new_session=True, preexec_fn=stage)
            with mock.patch.object(subprocess, "Popen", popen):  # Prefect's call, 2 more args
                return super()._run_uvicorn_command()

    return OwnSessionServer()  # Prefect's own singleton: its clients reuse it


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


def check_api(url: str, timeout: float = 10.0) -> None:
    """One line when `PREFECT_API_URL` names a server that does not answer (a `prefect
    server start` stopped or never started): Prefect's own failure comes after its
    retries, as a page of traceback."""
    if why := unreachable(url, timeout):
        raise AlexnetError(
            f"PREFECT_API_URL: no Prefect server answers at {url} ({why}); "
            "start it (`prefect server start`), or unset PREFECT_API_URL for a temporary one"
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
