"""What the benchmark scripts share: launching a `memserve serve` subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import grpc
from memserve.clients import Client


def launch_server(*options: str) -> tuple[subprocess.Popen, str]:
    """Starts `memserve serve` on a free loopback port; returns the process and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "memserve.clients.cli",
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--log-level",
        "WARNING",
        *options,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


def wait_for_first_token(process: subprocess.Popen, address: str, timeout: float = 600) -> None:
    """Polls until the server streams a token; raises if it exits or times out."""
    deadline = time.monotonic() + timeout
    with Client(address, timeout=60) as client:
        while time.monotonic() < deadline:
            try:
                next(iter(client.generate_stream("Hello", max_new_tokens=1)))
                return
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or process.poll() is not None:
                    raise SystemExit(
                        f"the server failed to start: {exc.code().name} {exc.details()}"
                    ) from exc
                time.sleep(0.05)
    raise SystemExit(f"the server did not serve a token within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)
