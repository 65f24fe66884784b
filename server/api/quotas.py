"""Per-tenant quotas: stored bytes, jobs not yet finished, and requests per second.

Each is answered RESOURCE_EXHAUSTED when a tenant is over it, with what it holds and what to do.
The defaults (`memserve serve --quota-…`) apply to every tenant; a tokens file may set a tenant's
own under "quotas", re-read with the tokens. 0 means no limit.

- stored bytes: the blobs the tenant's memories point at (a blob shared by versions counts
  once). A PutMemory that would cross the quota is refused, and so is a new job while the tenant
  is at or over it; a job accepted under the quota may leave the tenant above it by the memory it
  publishes, and the tenant's next job is refused until it deletes some.
- active jobs: the tenant's jobs queued or running, counted and checked in the same Redis script
  that queues a job, so that any number of servers cannot together let one too many in.
- requests per second: a token bucket per tenant in each server process (so N replicas allow N
  times the rate), holding one second of requests; every RPC and HTTP route counts once,
  streams included. A call is counted against the tenant it works in: its token's, else the one
  it names. Where reads need no token, anyone may name a tenant, so use `--auth-reads` where one
  tenant must not be able to spend another's rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from memserve.errors import InvalidArgument, ResourceExhausted

# Buckets of idle tenants are forgotten once this many are held: a client naming random tenants
# cannot grow the server's memory without bound.
MAX_IDLE_BUCKETS = 4096


@dataclass(frozen=True)
class Quota:
    """One tenant's limits; 0 = none."""

    stored_bytes: int = 0
    """Bytes of memories stored."""
    active_jobs: int = 0
    """Jobs queued or running at once."""
    requests_per_second: float = 0.0
    """Calls per second, one second's worth at once."""

    def over(self, **changes: Any) -> Quota:
        return replace(self, **changes)


QUOTA_FIELDS = {f.name for f in fields(Quota)}


def parse_quota(entry: Any, where: str) -> dict[str, Any]:
    """A tenant's quota in a tokens file: {"stored_bytes": int, "active_jobs": int,
    "requests_per_second": number}, each optional. Returns the fields it sets."""
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where} is not an object")
    unknown = set(entry) - QUOTA_FIELDS
    if unknown:
        raise InvalidArgument(f"{where}: unknown {sorted(unknown)}; a quota has {sorted(QUOTA_FIELDS)}")
    for name, value in entry.items():
        integral = name != "requests_per_second"
        number = isinstance(value, int) if integral else isinstance(value, int | float)
        if isinstance(value, bool) or not number or not math.isfinite(value) or value < 0:
            kind = "a whole number" if integral else "a number"
            raise InvalidArgument(f"{where}.{name} must be {kind} ≥ 0 (0: no limit), not {value!r}")
    return dict(entry)


class RateLimiter:
    """A token bucket per tenant: `rate` a second, up to `rate` (at least 1) at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tenant -> (tokens, at, rate)
        self._lock = threading.Lock()

    def admit(self, tenant: str, rate: float) -> None:
        if rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens = _level(self._buckets.get(tenant), now, rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now, rate)
                wait = (1.0 - tokens) / rate
                raise ResourceExhausted(
                    f"tenant {tenant!r} is over its {rate:g} requests per second: retry in {wait:.2f} s",
                    retry_after=wait,
                )
            self._buckets[tenant] = (tokens - 1.0, now, rate)
            if len(self._buckets) > MAX_IDLE_BUCKETS:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drops the buckets that have filled up again: forgetting them changes nothing."""
        full = [
            t
            for t, (tokens, at, rate) in self._buckets.items()
            if tokens + (now - at) * rate >= max(rate, 1.0)
        ]
        for tenant in full:
            del self._buckets[tenant]


def _level(bucket: tuple[float, float, float] | None, now: float, rate: float) -> float:
    """The tokens in a bucket now; a new bucket is full."""
    burst = max(rate, 1.0)
    if bucket is None:
        return burst
    tokens, at, _ = bucket
    return min(burst, tokens + (now - at) * rate)


class Quotas:
    """The quotas in force: the defaults, each tenant's own over them, and the request rate."""

    def __init__(self, default: Quota | None = None) -> None:
        self.default = default or Quota()
        self.rate = RateLimiter()

    def of(self, tenant: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Quota:
        own = (overrides or {}).get(tenant)
        return self.default.over(**own) if own else self.default


def check_stored_bytes(stored: int, adding: int, quota: Quota, tenant: str) -> None:
    """RESOURCE_EXHAUSTED when `adding` bytes (0: a job, whose size is not known yet) would take
    the tenant past its stored-bytes quota."""
    limit = quota.stored_bytes
    if not limit:
        return
    if (adding and stored + adding > limit) or (not adding and stored >= limit):
        what = f"adding {adding} bytes would exceed" if adding else "is at or over"
        raise ResourceExhausted(
            f"tenant {tenant!r} stores {stored} bytes of memories and {what} its quota of {limit} bytes: "
            "delete memories (or versions) it no longer needs"
        )
