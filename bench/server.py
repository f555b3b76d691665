"""Benchmark of an API call to a stage's temporary Prefect server, in one run: ours
(`flows.server.prefect_api`: a session of its own, on a socket the stage binds) vs
Prefect's own temporary server (`SubprocessASGIServer`), each started in a process of
its own, then the same calls timed on one keep-alive connection. Target: ours <= 1.2x
Prefect's per call (the socket handed to ours once lacked TCP_NODELAY: every answer
waited for the client's delayed acknowledgement, ~51 ms a call against ~6 ms).

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

# In a process of its own: start the server (ours, or Prefect's), then print the best of
# `repeats` rounds of `calls` calls, in seconds a call. The call is the one Prefect's
# clients make most while a flow runs: a small read of flow runs.
TIMED = """
import json, sys, time
import httpx
from flows.server import prefect_api
from prefect.server.api.server import SubprocessASGIServer

ours, calls, repeats = sys.argv[1] == "ours", int(sys.argv[2]), int(sys.argv[3])

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
    with prefect_api() as url:
        print(json.dumps(best(url)))
else:
    server = SubprocessASGIServer()
    server.start(timeout=90)
    try:
        print(json.dumps(best(server.api_url)))
    finally:
        server.stop()
"""


def seconds_a_call(which: str, calls: int, repeats: int) -> float:
    """Per call, the best of `repeats` rounds, on `which` server ("ours" or "prefect")."""
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
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours = seconds_a_call("ours", args.calls, args.repeats)
    stock = seconds_a_call("prefect", args.calls, args.repeats)
    print(f"an API call to the temporary server, best of {args.repeats} rounds of {args.calls}")
    print_ms_ratio(("flows.server", ours), ("Prefect's SubprocessASGIServer", stock), 1.2)


if __name__ == "__main__":
    main()
