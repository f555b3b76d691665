"""Benchmark of a stage's temporary Prefect server, in one run: ours
(`flows.server.prefect_api`: a session of its own, on a socket the stage binds) vs
Prefect's own temporary server (`SubprocessASGIServer`), each started in a process of
its own. Timed: the starting process's CPU until its server answers (ours does not
import Prefect's server, which runs in another process: target <= 0.75x), then the same
API calls on one keep-alive connection (target <= 1.2x: the socket handed to ours once
lacked TCP_NODELAY, and every answer waited for the client's delayed acknowledgement,
~51 ms a call against ~6 ms).

    python bench/server.py [--calls 100] [--repeats 3]   (run by `make bench`)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_ms_ratio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# In a process of its own: start the server (ours, or Prefect's), then print this
# process's CPU seconds until it answered, and the best of `repeats` rounds of `calls`
# calls, in seconds a call. The call is the one Prefect's clients make most while a flow
# runs: a small read of flow runs.
TIMED = """
import json, resource, sys, time
import httpx

ours, calls, repeats = sys.argv[1] == "ours", int(sys.argv[2]), int(sys.argv[3])

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def best(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/health").raise_for_status()  # the connection made, not timed
        rounds = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                client.post("/flow_runs/filter", json={"limit": 1}).raise_for_status()
            rounds.append((time.perf_counter() - start) / calls)
        return min(rounds)

if ours:
    from flows.server import prefect_api

    with prefect_api() as url:
        started = cpu()
        print(json.dumps([started, best(url)]))
else:
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=90)
    try:
        started = cpu()
        print(json.dumps([started, best(server.api_url)]))
    finally:
        server.stop()
"""


def timed(which: str, calls: int, repeats: int) -> tuple[float, float]:
    """The CPU seconds to start `which` server ("ours" or "prefect"), and the seconds a
    call, the best of `repeats` rounds."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
    done = subprocess.run(
        [sys.executable, "-c", TIMED, which, str(calls), str(repeats)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    started, call = json.loads(done.stdout.splitlines()[-1])
    return started, call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours = timed("ours", args.calls, args.repeats)
    stock = timed("prefect", args.calls, args.repeats)
    names = ("flows.server", "Prefect's SubprocessASGIServer")
    print("the starting process's CPU until its temporary server answers")
    print_ms_ratio((names[0], ours[0]), (names[1], stock[0]), 0.75)
    print(f"an API call to the temporary server, best of {args.repeats} rounds of {args.calls}")
    print_ms_ratio((names[0], ours[1]), (names[1], stock[1]), 1.2)


if __name__ == "__main__":
    main()
