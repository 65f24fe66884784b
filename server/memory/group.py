"""One op per (kind, layer, site) and forward, shared by every request that uses a memory there.

Many requests in a batch may use one loaded memory with different keys and scales; running
one op per request would cost one small kernel each. A group op collects the requests'
bound memories (`members`) and their batch rows while the forward's context is built, and
runs once at its site. The members are also who a failure is blamed on: the engine fails
exactly the requests whose memory is in a failing group op.

Every member reads the same input and the updates add up, so a request that uses several
memories of a kind gets the same result whatever order they come in, alone or in any batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Generic, Protocol, Self, TypeVar

import torch

from memserve.memory.hooks import GroupKey, MemoryContext, Site, rows_and_scales


class GroupMember(Protocol):
    """A request's bound memory, as a group op sees it."""

    name: str
    scale: float

    @property
    def loaded(self) -> object:
        """The loaded memory it binds (shared by every request that uses that version)."""


M = TypeVar("M", bound=GroupMember)


class GroupOp(ABC, Generic[M]):
    """Every row of one forward that uses memories of one kind at one (layer, site)."""

    def __init__(self, context: MemoryContext, key: GroupKey) -> None:
        self.context = context
        self.key = key
        self.members: list[M] = []
        self.rows: list[torch.Tensor] = []

    @classmethod
    def join(cls, context: MemoryContext, key: GroupKey, member: M, rows: torch.Tensor) -> Self:
        """The context's group op at `key` (made and placed at its site on first use), joined."""
        group = context.groups.get(key)
        if group is None:
            group = cls(context, key)
            context.groups[key] = group
            context.add(key.layer, key.site, group, group.op)
        if not isinstance(group, cls):
            raise TypeError(f"{key} holds a {type(group).__name__}, not a {cls.__name__}")
        group.members.append(member)
        group.rows.append(rows)
        return group

    @property
    def name(self) -> str:
        """The memories it runs, as users know them (errors and traces name them)."""
        return ", ".join(sorted({m.name for m in self.members}))

    def by_memory(self) -> Iterator[list[tuple[M, torch.Tensor]]]:
        """(member, rows) pairs, grouped by the loaded memory they bind (two versions of one
        name are two memories)."""
        grouped: dict[int, list[tuple[M, torch.Tensor]]] = {}
        for member, rows in zip(self.members, self.rows, strict=True):
            grouped.setdefault(id(member.loaded), []).append((member, rows))
        yield from grouped.values()

    def traced(self) -> Iterator[tuple[M, int]]:
        """(member, batch row) for every row that asked for a memory trace."""
        for member, rows in zip(self.members, self.rows, strict=True):
            for _, row in self.context.traced_rows(rows):
                yield member, row

    @abstractmethod
    def op(self, hidden: torch.Tensor) -> torch.Tensor:
        """The site's activation (B, T, D) of the whole batch → the new one."""


def residual_key(kind: str, layer: int) -> GroupKey:
    return GroupKey(kind, layer, Site.RESIDUAL)


def rows_of(
    pairs: list[tuple[M, torch.Tensor]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch rows of one loaded memory's members, and their scales (None when all are 1)."""
    return rows_and_scales([(member.scale, rows) for member, rows in pairs], dtype)


def add_rows(
    out: torch.Tensor, rows: torch.Tensor, update: torch.Tensor, scales: torch.Tensor | None
) -> torch.Tensor:
    """`out` with the (R, T, D) update, scaled per row, added at `rows`."""
    return out.index_add(0, rows, update if scales is None else update * scales)
