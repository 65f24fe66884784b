"""The pieces of the table of calls (`calls.Calls`): one `Call` per method of the clients.

A call says which RPC it makes, how its typed arguments become the request (`build`, whose
signature is the method's) and how the response becomes the result (`convert`). Its shape says
how the transport runs it:

    unary   one request, one response               -> convert(response)
    stream  one request, a stream of responses      -> convert(each response), as they come
    paged   a listing, one request per page         -> all the pages' items
    fold    a stream of responses fed to a sink     -> what the sink makes of them
    upload  a stream of requests from a source      -> convert(response)

`Client` and `AsyncClient` (`transport.Blocking` and `transport.Asyncio`) turn each call into a real
method with the build function's signature. Type checkers read the same signature from the
descriptor types below: `Single` gives `R` (blocking) or a coroutine of `R` (asyncio), `Streaming`
a generator or an async generator of `R`.
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from google.protobuf.message import Message

if TYPE_CHECKING:
    from typing import Self

    from memserve.clients.transport import Asyncio, Blocking

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Shape(enum.Enum):
    """How a call runs; the value names the transport's method that runs it."""

    UNARY = "_unary"
    STREAM = "_stream"
    PAGED = "_paged"
    FOLD = "_fold"
    UPLOAD = "_upload"


class Sink(Protocol[R_co]):
    """Where a fold puts the items of a stream: used as a context manager around the whole stream."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...
    def add(self, item: Any) -> None: ...
    def result(self) -> R_co: ...


Upload = AbstractContextManager[Iterator[Message]]
"""The requests of a client stream, with what must be released after them (an open file)."""


class Call(Generic[P, R]):
    """One call of the table: an RPC, the request builder and the response converter."""

    def __init__(
        self,
        shape: Shape,
        stub: type,
        rpc: str,
        build: Callable[P, Any],
        convert: Callable[[Any], Any],
        *,
        first: Callable[[Any], Any] | None = None,
        doc: str | None = None,
    ) -> None:
        self.shape, self.stub, self.rpc = shape, stub, rpc
        self.build, self.convert, self.first = build, convert, first
        self.name = build.__name__
        # What the call does, then the arguments as the build function describes them.
        self.__doc__ = "\n\n".join(inspect.cleandoc(text) for text in (doc, build.__doc__) if text)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def item(self, response: Any, index: int) -> Any:
        """The result of a stream's `index`-th response."""
        return (self.first if index == 0 and self.first else self.convert)(response)

    def parameters(self) -> list[inspect.Parameter]:
        """The method's parameters: `self`, then those of `build`."""
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [this, *inspect.signature(self.build, eval_str=True).parameters.values()]

    def returns(self) -> Any:
        """What the method gives (for a stream, what each item is)."""
        if self.shape is Shape.FOLD:
            sink = _return_type(self.build).__args__[1]
            return _return_type(sink.result)
        result = _return_type(self.convert)
        return result.__args__[0] if self.shape is Shape.PAGED else result


def _return_type(function: Callable[..., Any]) -> Any:
    return typing.get_type_hints(function)["return"]


class Single(Call[P, R]):
    """A call with one result: a method returning `R`, or a coroutine of `R` on `AsyncClient`."""

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: Asyncio, owner: type | None = None) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __get__(self, obj: Blocking, owner: type | None = None) -> Callable[P, R]: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else type(obj)._method(self).__get__(obj, owner)


class Streaming(Call[P, R]):
    """A call that streams results: a generator of `R`, or an async generator on `AsyncClient`."""

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: Asyncio, owner: type | None = None) -> Callable[P, AsyncGenerator[R, None]]: ...
    @overload
    def __get__(self, obj: Blocking, owner: type | None = None) -> Callable[P, Generator[R, None, None]]: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else type(obj)._method(self).__get__(obj, owner)


def unary(
    stub: type, rpc: str, build: Callable[P, Message], convert: Callable[[Any], R], *, doc: str | None = None
) -> Single[P, R]:
    """One request, one response."""
    return Single(Shape.UNARY, stub, rpc, build, convert, doc=doc)


def stream(
    stub: type,
    rpc: str,
    build: Callable[P, Message],
    convert: Callable[[Any], R],
    *,
    first: Callable[[Any], R] | None = None,
    doc: str | None = None,
) -> Streaming[P, R]:
    """A server stream: each response converted (the first one by `first`, when given)."""
    return Streaming(Shape.STREAM, stub, rpc, build, convert, first=first, doc=doc)


def paged(
    stub: type,
    rpc: str,
    build: Callable[P, Message],
    convert: Callable[[Any], tuple[list[R], str]],
    *,
    doc: str | None = None,
) -> Single[P, list[R]]:
    """A listing: `convert` gives a page's items and the next page's token ("" after the last)."""
    return Single(Shape.PAGED, stub, rpc, build, convert, doc=doc)


def fold(
    stub: type,
    rpc: str,
    build: Callable[P, tuple[Message, Sink[R]]],
    convert: Callable[[Any], Any],
    *,
    doc: str | None = None,
) -> Single[P, R]:
    """A server stream whose converted responses go to the sink `build` gives with the request."""
    return Single(Shape.FOLD, stub, rpc, build, convert, doc=doc)


def upload(
    stub: type, rpc: str, build: Callable[P, Upload], convert: Callable[[Any], R], *, doc: str | None = None
) -> Single[P, R]:
    """A client stream of the requests `build` gives; one response."""
    return Single(Shape.UPLOAD, stub, rpc, build, convert, doc=doc)
