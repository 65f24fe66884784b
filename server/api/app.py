"""Assembling and running the server: model, engine, gRPC services, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from uvicorn import Config as UvicornConfig
from uvicorn import Server as UvicornServer

from memserve.api.auth import Auth
from memserve.api.evaluation import EvaluationService
from memserve.api.generation import GenerationService
from memserve.api.http import Draining, build_app, wait_started
from memserve.api.interceptor import ErrorInterceptor
from memserve.api.jobs import JobService
from memserve.api.memories import MemoryService
from memserve.api.quotas import Quota
from memserve.api.tls import TlsConfig
from memserve.engine.scheduler import Engine, EngineConfig
from memserve.memory.registry import registered_kinds
from memserve.memory.runtime import StoreConfig, StoreRuntime
from memserve.metrics import (
    DEFAULT_MAX_MEMORY_LABELS,
    QUEUE_DEPTH,
    RUNNING_REQUESTS,
    EngineMetrics,
    MemoryMetrics,
    precreate_job_series,
    register_job_queue,
)
from memserve.models import LoadedModel, ModelConfig, load_model
from memserve.v1 import (
    evaluation_pb2,
    evaluation_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
)

log = logging.getLogger(__name__)


class _ClientLeftFilter(logging.Filter):
    """grpc's asyncio server logs an error with a traceback when a streaming handler writes to a
    client that has just cancelled (`ExecuteBatchError raised in core by servicer method`): a
    client leaving is not a server error, and the request metrics count it as CANCELLED."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")


logging.getLogger("grpc._cython.cygrpc").addFilter(_ClientLeftFilter())

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    evaluation_pb2.DESCRIPTOR.services_by_name["EvaluationService"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 to accept connections from other machines."""
    port: int = 50051
    http_port: int | None = None
    """The HTTP (OpenAI-compatible) API's port; 0 = any free port (tests); None = no HTTP API.
    `memserve serve` serves it on 8000."""
    metrics_port: int | None = 9464
    """Prometheus /metrics port; 0 = any free port (tests); None = no metrics endpoint."""
    auth_token: str | None = None
    """A bearer token for every RPC and tenant; None = none (`serve` reads $MEMSERVE_TOKEN)."""
    tokens_file: Path | None = None
    """Tokens bound to tenants and scopes (docs/operations.md); re-read when it changes."""
    auth_reads: bool = False
    """Require a token for reading and generating too, not only for changes."""
    quota: Quota = field(default_factory=Quota)
    """Every tenant's quotas (0: none), unless the tokens file sets its own."""
    metrics_max_memory_labels: int = DEFAULT_MAX_MEMORY_LABELS
    """Memories (banks, sets, adapters) that get a metrics label of their own; later ones: `other`."""
    store: StoreConfig | None = field(default_factory=StoreConfig)
    """The memory store (Redis URL, cache, workers); None = serve without memories."""
    max_message_bytes: int = 16 << 20
    """Largest gRPC message either way; artifacts travel in chunks well below it."""
    tls: TlsConfig | None = None
    """TLS on the gRPC and HTTP ports (the metrics port stays plain HTTP); None = plaintext."""
    shutdown_grace_seconds: float = 10.0
    """In-flight requests get this long to finish on SIGTERM/SIGINT."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


class RunningServer:
    """A started server; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        engine: Engine,
        health_servicer: health.aio.HealthServicer,
        port: int,
        runtime: StoreRuntime | None,
        metrics: WSGIServer | None = None,
        http: HttpFront | None = None,
    ) -> None:
        self.server = server
        self.engine = engine
        self.health = health_servicer
        self.port = port
        self.runtime = runtime
        self.metrics = metrics
        self.metrics_port = metrics.server_port if metrics is not None else None
        self.http = http
        self.http_port = http.port if http is not None else None

    async def stop(self, grace: float) -> None:
        """Refuses new requests at once, gives in-flight ones `grace` seconds, then ends them.

        Requests still running when the grace period ends fail with CANCELLED and a
        message saying the server shut down, before the transport closes.
        """
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.draining.on = True
        transport = asyncio.ensure_future(self.server.stop(grace + 5))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self.engine.running or self.engine.queue_depth) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.engine.stop)
        await transport
        if self.http is not None:
            await self.http.stop()
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.shutdown)
            self.metrics.server_close()


async def start_server(config: ServerConfig) -> RunningServer:
    started = time.perf_counter()
    loaded = await asyncio.to_thread(load_model, config.model)
    log.info(
        "loaded %s (%s, %s, %s) in %.1f s",
        loaded.name,
        loaded.dtype,
        loaded.device,
        loaded.weights,
        time.perf_counter() - started,
    )
    loop = asyncio.get_running_loop()
    health_servicer = health.aio.HealthServicer()

    def on_engine_death() -> None:  # from the engine thread: the server can no longer serve
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(health_servicer.enter_graceful_shutdown()))

    # Without a metrics port nothing pays for statistics: no observer is installed.
    metered = config.metrics_port is not None
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        config.engine,
        observer=EngineMetrics() if metered else None,
        on_death=on_engine_death,
    )
    runtime = None
    if config.store is not None:
        observe = MemoryMetrics(config.metrics_max_memory_labels) if metered else None
        runtime = await asyncio.to_thread(StoreRuntime, config.store, loaded, engine.hooks, loop, observe)
    try:
        return await _start(config, loaded, engine, runtime, health_servicer, started)
    except BaseException:
        if runtime is not None:
            await asyncio.to_thread(runtime.close)
        raise


async def _start(
    config: ServerConfig,
    loaded: LoadedModel,
    engine: Engine,
    runtime: StoreRuntime | None,
    health_servicer: health.aio.HealthServicer,
    started: float,
) -> RunningServer:
    # A bad tokens file: an error now.
    auth = Auth(config.auth_token, config.tokens_file, config.auth_reads, config.quota)
    server, services = _grpc_server(config, loaded, engine, runtime, health_servicer, auth)
    # Bind every port before anything starts, so a busy port is a clean error.
    port = _listen(server, f"{config.host}:{config.port}", config.tls)
    http_socket = None if config.http_port is None else _bind(config.host, config.http_port, "the HTTP API")
    try:
        metrics_server = _start_metrics(config, engine, runtime)
    except BaseException:
        if http_socket is not None:
            http_socket.close()
        raise
    if not auth.enabled and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without $MEMSERVE_TOKEN: anyone who reaches it can change memories",
            config.host,
        )
    engine.start()
    await server.start()
    http = None
    if http_socket is not None:
        draining = Draining()
        app = build_app(services["generation"], services, auth, lambda: engine.alive, draining)
        http = await HttpFront.start(app, http_socket, draining, config.shutdown_grace_seconds, config.tls)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    scheme = "" if config.tls is None else (" over mutual TLS" if config.tls.mutual else " over TLS")
    log.info(
        "serving %s on %s:%d (gRPC)%s%s (ready %.1f s after start)",
        loaded.name,
        config.host,
        port,
        "" if http is None else f" and {config.host}:{http.port} (HTTP)",
        scheme,
        time.perf_counter() - started,
    )
    return RunningServer(server, engine, health_servicer, port, runtime, metrics_server, http)


class _EmbeddedUvicorn(UvicornServer):
    """uvicorn inside our event loop: the server's own signal handlers drain both protocols."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFront:
    """The HTTP API, served by uvicorn on an already-bound socket."""

    def __init__(
        self, server: _EmbeddedUvicorn, task: asyncio.Task[None], port: int, draining: Draining
    ) -> None:
        self.server = server
        self.task = task
        self.port = port
        self.draining = draining

    @classmethod
    async def start(
        cls, app: object, sock: socket.socket, draining: Draining, grace: float, tls: TlsConfig | None = None
    ) -> HttpFront:
        config = UvicornConfig(
            app,
            lifespan="off",
            log_config=None,  # keep the server's logging
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=int(grace) + 1,
            **({} if tls is None else tls.uvicorn_options()),
        )
        server = _EmbeddedUvicorn(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        await wait_started(server, task)
        return cls(server, task, sock.getsockname()[1], draining)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


def _bind(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); OSError naming `what` when taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise OSError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _grpc_server(
    config: ServerConfig,
    loaded: LoadedModel,
    engine: Engine,
    runtime: StoreRuntime | None,
    health_servicer: health.aio.HealthServicer,
    auth: Auth,
) -> tuple[grpc.aio.Server, dict[str, object]]:
    """The gRPC server with its services (the memory and job services only with a store),
    health and reflection, not yet listening; and the servicers by name, for the HTTP front."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Without this a second server on the same port starts silently and steals requests.
            ("grpc.so_reuseport", 0),
        ],
    )
    generation = GenerationService(engine, loaded, runtime)
    services: dict[str, object] = {"generation": generation}
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server(
        EvaluationService(engine, loaded, runtime), server
    )
    if runtime is not None:
        services["memories"] = MemoryService(runtime, auth)
        services["jobs"] = JobService(runtime, auth)
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(services["memories"], server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(services["jobs"], server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, services


def _listen(server: grpc.aio.Server, address: str, tls: TlsConfig | None = None) -> int:
    """Binds `address`; returns the port (the one chosen, for port 0). OSError when it is taken."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: is another server using the port?") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address}: is another server using the port?")
    return int(port)


def _start_metrics(config: ServerConfig, engine: Engine, runtime: StoreRuntime | None) -> WSGIServer | None:
    """The Prometheus endpoint, serving the engine's and the job queue's gauges; None without
    a metrics port."""
    if config.metrics_port is None:
        return None
    try:
        metrics_server, _ = start_http_server(config.metrics_port, addr=config.host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}") from exc
    QUEUE_DEPTH.set_function(lambda: engine.queue_depth)
    RUNNING_REQUESTS.set_function(lambda: engine.running)
    if runtime is not None:
        register_job_queue(runtime.queue.depth, runtime.queue.workers_alive)
        precreate_job_series(registered_kinds())
    return metrics_server


async def serve(config: ServerConfig) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight requests."""
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down; in-flight requests get %.0f s", config.shutdown_grace_seconds)
    await running.stop(config.shutdown_grace_seconds)
