"""``mmspec serve`` in tests: a subprocess on a free port waited for on ``/health`` (as a user starts it), and
requests posted at once."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time


@contextlib.contextmanager
def live_serve(*args: str, wait_seconds: float = 300.0):
    """Yield the base URL (``http://127.0.0.1:PORT/v1``) of ``mmspec serve ARGS --port PORT``; the server's output
    is the error when it exits before answering."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mmspec", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode()[-2000:]) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"mmspec serve did not answer within {wait_seconds} s") from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def post_concurrently(client, path: str, bodies: list[dict]) -> list:
    """``client.post(path, json=body)`` for every body at once (a thread each); the responses in order."""
    import threading

    results: list = [None] * len(bodies)

    def call(i: int) -> None:
        results[i] = client.post(path, json=bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results
