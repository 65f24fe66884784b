"""The two transports: how a call of the table runs, blocking (`Blocking`) or on asyncio (`Asyncio`).

A transport class that mixes in the table (`calls.Calls`) gets one real method per call, made
here with the signature and docstring of the call. The transports differ only in how they wait;
building requests and converting responses is the calls' work, the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from types import GenericAlias
from typing import Any, ClassVar

import grpc

from memserve.clients.calls import STUBS
from memserve.clients.errors import typed_errors
from memserve.clients.rpc import Call, Shape, Sink, Upload
from memserve.v1.generation_pb2_grpc import GenerationServiceStub

DEFAULT_SERVER = "localhost:50051"
TENANT_METADATA = "memserve-tenant"


def default_server() -> str:
    """$MEMSERVE_SERVER, or localhost:50051."""
    return os.environ.get("MEMSERVE_SERVER", DEFAULT_SERVER)


def default_tenant() -> str | None:
    """$MEMSERVE_TENANT, or None (the server's default tenant)."""
    return os.environ.get("MEMSERVE_TENANT") or None


def default_token() -> str | None:
    """$MEMSERVE_TOKEN, or None: the bearer token a server with auth wants for mutating RPCs."""
    return os.environ.get("MEMSERVE_TOKEN") or None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def channel_credentials(
    tls: bool | None = None,
    ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials | None:
    """The TLS credentials of a channel, or None for plaintext.

    Each argument left None takes its environment variable: $MEMSERVE_TLS (1/true), $MEMSERVE_CA,
    $MEMSERVE_CLIENT_CERT, $MEMSERVE_CLIENT_KEY. A CA or a client certificate turns TLS on; without
    a CA the system's roots check the server. `tls=False` is plaintext whatever the environment.
    """
    if tls is False:
        return None
    ca = ca or os.environ.get("MEMSERVE_CA") or None
    client_cert = client_cert or os.environ.get("MEMSERVE_CLIENT_CERT") or None
    client_key = client_key or os.environ.get("MEMSERVE_CLIENT_KEY") or None
    if not (tls or _env_flag("MEMSERVE_TLS") or ca or client_cert or client_key):
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "CA"),
        private_key=_pem(client_key, "client key"),
        certificate_chain=_pem(client_cert, "client certificate"),
    )


def _pem(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} at {path}: {exc.strerror or exc}") from exc


def channel_options(address: str) -> list[tuple[str, Any]]:
    """A target naming several servers (`dns:///` a headless service, `ipv4:a:1,b:2`) is balanced
    round-robin over all of them; gRPC's default would send every call to the first."""
    if address.startswith(("dns:", "ipv4:", "ipv6:")):
        return [("grpc.lb_policy_name", "round_robin")]
    return []


def _metadata(tenant: str | None, token: str | None) -> tuple[tuple[str, str], ...] | None:
    pairs: tuple[tuple[str, str], ...] = ((TENANT_METADATA, tenant),) if tenant else ()
    pairs += (("authorization", f"Bearer {token}"),) if token else ()
    return pairs or None


class Transport:
    """A channel to a server, its stubs, and the options every call carries."""

    _generator: ClassVar[tuple[type, tuple[None, ...]]]
    """How a streaming method's result is annotated: a generator type and its arguments after the
    type of the items."""

    def __init__(
        self,
        address: str | None = None,
        timeout: float | None = None,
        tenant: str | None = None,
        token: str | None = None,
        *,
        tls: bool | None = None,
        ca: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.address = address or default_server()
        self.timeout = timeout
        self.tenant = default_tenant() if tenant is None else tenant
        self.token = default_token() if token is None else token
        credentials = channel_credentials(tls, ca, client_cert, client_key)
        self.tls = credentials is not None
        self._channel = self._connect(self.address, credentials)
        self._stubs: dict[type, Any] = {stub: stub(self._channel) for stub in STUBS}
        self._stub = self._stubs[GenerationServiceStub]  # for calls made by hand (tests)

    @staticmethod
    def _connect(address: str, credentials: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Makes a method of each call the class inherits and does not define itself."""
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            call = inspect.getattr_static(cls, name)
            if isinstance(call, Call):
                setattr(cls, name, cls._described(cls._method(call), call, name))

    @classmethod
    def _method(cls, call: Call[..., Any]) -> Callable[..., Any]:
        """The method of a call: it builds the request and has the transport's runner for the call's
        shape (`_unary`, `_stream`, ...) make the call. The blocking transport and both transports'
        streams use this one (a stream returns the runner's generator)."""

        def method(self: Transport, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, call.shape.value)(call, call.build(*args, **kwargs))

        return method

    @classmethod
    def _described(cls, method: Callable[..., Any], call: Call[..., Any], name: str) -> Callable[..., Any]:
        """`method` named, documented and annotated as the call's method on this class."""
        returns = call.returns()
        if call.shape is Shape.STREAM:
            generator, rest = cls._generator
            returns = GenericAlias(generator, (returns, *rest))
        parameters = call.parameters()
        method.__name__, method.__qualname__ = name, f"{cls.__name__}.{name}"
        method.__module__, method.__doc__ = cls.__module__, call.__doc__
        method.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
        method.__annotations__ = {p.name: p.annotation for p in parameters[1:]} | {"return": returns}
        return method

    @property
    def _options(self) -> dict[str, Any]:
        """Per-call options, read at each call so that changing `timeout` or `tenant` takes effect."""
        return {"timeout": self.timeout, "metadata": _metadata(self.tenant, self.token)}

    def _rpc(self, call: Call[..., Any]) -> Any:
        return getattr(self._stubs[call.stub], call.rpc)


class Blocking(Transport):
    """Runs the calls on a blocking channel."""

    _generator = (Generator, (None, None))

    @staticmethod
    def _connect(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(address, channel_options(address))
        return grpc.secure_channel(address, credentials, channel_options(address))

    def _unary(self, call: Call[..., Any], request: Any) -> Any:
        with typed_errors():
            return call.convert(self._rpc(call)(request, **self._options))

    def _stream(self, call: Call[..., Any], request: Any) -> Generator[Any, None, None]:
        responses = self._rpc(call)(request, **self._options)
        try:
            with typed_errors():
                for index, response in enumerate(responses):
                    yield call.item(response, index)
        finally:
            responses.cancel()  # a consumer that stops early frees the server's slot

    def _paged(self, call: Call[..., Any], request: Any) -> list[Any]:
        results: list[Any] = []
        while True:
            items, request.page_token = self._unary(call, request)
            results += items
            if not request.page_token:
                return results

    def _fold(self, call: Call[..., Any], built: tuple[Any, Sink[Any]]) -> Any:
        request, sink = built
        with sink, contextlib.closing(self._stream(call, request)) as items:
            for item in items:
                sink.add(item)
            return sink.result()

    def _upload(self, call: Call[..., Any], upload: Upload) -> Any:
        with upload as requests:
            return self._unary(call, requests)


class Asyncio(Transport):
    """Runs the calls on an asyncio channel; file work goes to a thread."""

    _generator = (AsyncGenerator, (None,))

    @staticmethod
    def _connect(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address, channel_options(address))
        return grpc.aio.secure_channel(address, credentials, channel_options(address))

    @classmethod
    def _method(cls, call: Call[..., Any]) -> Callable[..., Any]:
        if call.shape is Shape.STREAM:
            return super()._method(call)

        async def method(self: Asyncio, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self, call.shape.value)(call, call.build(*args, **kwargs))

        return method

    async def _unary(self, call: Call[..., Any], request: Any) -> Any:
        with typed_errors():
            return call.convert(await self._rpc(call)(request, **self._options))

    async def _stream(self, call: Call[..., Any], request: Any) -> AsyncGenerator[Any, None]:
        responses = self._rpc(call)(request, **self._options)
        try:
            with typed_errors():
                index = 0
                async for response in responses:
                    yield call.item(response, index)
                    index += 1
        finally:
            responses.cancel()

    async def _paged(self, call: Call[..., Any], request: Any) -> list[Any]:
        results: list[Any] = []
        while True:
            items, request.page_token = await self._unary(call, request)
            results += items
            if not request.page_token:
                return results

    async def _fold(self, call: Call[..., Any], built: tuple[Any, Sink[Any]]) -> Any:
        request, sink = built
        async with contextlib.aclosing(self._stream(call, request)) as items:
            with sink:
                async for item in items:
                    await asyncio.to_thread(sink.add, item)
                return await asyncio.to_thread(sink.result)

    async def _upload(self, call: Call[..., Any], upload: Upload) -> Any:
        with upload as requests:
            return await self._unary(call, _in_thread(requests))


async def _in_thread(items: Iterator[Any]) -> AsyncIterator[Any]:
    """The items of a blocking iterator (reading a file), each taken in a thread."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item
