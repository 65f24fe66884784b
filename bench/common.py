"""What the benchmark scripts share: launching a `memserve serve` subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import grpc

from memserve.clients import Client


def launch_server(*options: str) -> tuple[subprocess.Popen, str]:
    """Starts `memserve serve` on a free loopback port; returns the process and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if "--redis-url" not in options:  # an embedded Redis of its own, not the user's
        options = (*options, "--data-dir", tempfile.mkdtemp(prefix="memserve-bench-data-"))
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
    """Waits until the server streams a token; raises if it exits or times out.

    The port is polled with plain sockets: a gRPC channel that failed to connect
    backs off for up to seconds before retrying, which would inflate the timing.
    """
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited during start-up (code {process.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not listen within {timeout:.0f} s")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)
    with Client(address, timeout=timeout) as client:
        try:
            next(iter(client.generate_stream("Hello", max_new_tokens=1)))
        except grpc.RpcError as exc:
            raise SystemExit(
                f"the server failed its first request: {exc.code().name} {exc.details()}"
            ) from exc


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)
