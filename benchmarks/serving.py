"""Start `ovr serve` for a benchmark: a free port, the process, and a wait until it reports ready."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *args: str, env: dict, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`ovr serve MODEL --port P ARGS` -> (the process, its URL), once /v2/health/ready answers 200 (it answers 503
    while the server warms up). Raises if the process exits or is not ready within `timeout` seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ovr", "serve", str(model), "--port", str(port), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ovr serve exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"ovr serve was not ready within {timeout:.0f} s")
