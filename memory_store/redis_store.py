"""The memory store on Redis (standalone ≥ 6.2 or Redis Cluster).

Key layout, per tenant ``t`` and memory name ``n`` (the braces are a Redis
Cluster hash tag: one memory's keys live on one slot, so its Lua script runs
on one node):

- ``memserve:m:{t/n}:meta``  hash: ``current`` → version, ``next`` → last
  allocated version, ``v<N>`` → metadata JSON of version N, ``job:<id>`` → the
  version that job published (so a retried job never publishes twice);
- ``memserve:m:{t/n}:blob:<sha256>``  the safetensors blob, content-addressed:
  it is written before the version that points to it, so a reader never sees a
  version without its blob;
- ``memserve:idx:{t}``  sorted set of the tenant's names (all scores 0: listing
  by prefix is a lexicographic range);
- channel ``memserve:changes``  one JSON message per published or deleted version.

Nothing read from Redis is ever unpickled: metadata is JSON, tensors are safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from memserve.errors import (
    DataLoss,
    InvalidArgument,
    MemserveError,
    NotFound,
    Unavailable,
)
from memserve.memory_store import lua
from memserve.memory_store.artifact import (
    Artifact,
    MemoryMeta,
    decode,
    encode,
    export_header,
)
from memserve.names import DEFAULT_TENANT, check_name, check_tenant

log = logging.getLogger(__name__)

CHANGES_CHANNEL = "memserve:changes"
CLUSTER_SCHEME = "redis+cluster://"

RedisClient = redis.Redis | RedisCluster


def redacted(url: str) -> str:
    """`url` with its password replaced by ***, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, *, decode_responses: bool = False, retries: int = 2) -> RedisClient:
    """A client for `url`: redis://, rediss:// or unix:// for one server,
    redis+cluster://host:port for a cluster (any node; the rest are discovered).

    Retries with a short backoff, so a blip is absorbed and an outage fails fast
    (`retries=0` surfaces every disconnection, as the event listener needs).
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "decode_responses": decode_responses,
        "socket_read_size": 1 << 20,  # artifacts are megabytes: fewer, larger reads
    }
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME) :], **options)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidArgument(
            f"Redis URL {redacted(url)!r} is not valid: use redis://host:port, rediss://, unix:///path, "
            "or redis+cluster://host:port"
        )
    return redis.Redis.from_url(url, health_check_interval=10, **options)


def store_error(exc: RedisError) -> MemserveError:
    """The status a Redis failure deserves: UNAVAILABLE when Redis cannot be reached (or is
    loading), INTERNAL when it answered with an error (out of memory, a bug)."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | BusyLoadingError):
        return Unavailable(f"the memory store (Redis) is unreachable: {exc}; retry shortly")
    return MemserveError(f"the memory store (Redis) refused the operation: {exc}")


@dataclass(frozen=True)
class Change:
    """One message of the changes channel."""

    tenant: str
    name: str
    version: int  # 0 with op "delete": every version
    op: str  # "publish" | "delete"


@dataclass(frozen=True)
class Page:
    memories: list[MemoryMeta]
    next_token: str


class RedisStore:
    """Versioned, immutable memory artifacts in Redis. Thread-safe (redis-py pools)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._publish = client.register_script(lua.PUBLISH)
        self._delete = client.register_script(lua.DELETE_VERSIONS)
        self._drop_blob = client.register_script(lua.DROP_BLOB)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(connect(url))

    # --- keys ---------------------------------------------------------------
    @staticmethod
    def _meta_key(tenant: str, name: str) -> str:
        return f"memserve:m:{{{tenant}/{name}}}:meta"

    @staticmethod
    def _blob_key(tenant: str, name: str, sha256: str) -> str:
        return f"memserve:m:{{{tenant}/{name}}}:blob:{sha256}"

    @staticmethod
    def _index_key(tenant: str) -> str:
        return f"memserve:idx:{{{tenant}}}"

    # --- writing ------------------------------------------------------------
    def publish(
        self, meta: MemoryMeta, tensors: dict[str, Any], *, job_id: str = "", make_current: bool = True
    ) -> MemoryMeta:
        """Stores a new version atomically and announces it; returns its metadata.

        With `job_id`, publishing is idempotent: a second call for the same job
        returns the version the first one published and writes nothing.
        """
        check_tenant(meta.tenant)
        check_name(meta.name)
        meta, blob = encode(replace(meta, source_job=job_id or meta.source_job), tensors)
        return self.publish_blob(meta, blob, job_id=job_id, make_current=make_current)

    def publish_blob(
        self, meta: MemoryMeta, blob: bytes, *, job_id: str = "", make_current: bool = True
    ) -> MemoryMeta:
        tenant, name = meta.tenant, meta.name
        meta_key = self._meta_key(tenant, name)
        blob_key = self._blob_key(tenant, name, meta.sha256)
        try:
            # The index first (harmless without a version); the blob and the version in one
            # script, so that a failure leaves no blob behind and no version without its blob.
            self.client.zadd(self._index_key(tenant), {name: 0})
            version, new = self._publish(
                keys=[meta_key, blob_key], args=[job_id, meta.to_json(), "1" if make_current else "0", blob]
            )
        except RedisError as exc:
            raise store_error(exc) from exc
        published = replace(meta, version=int(version))
        if new:
            self._announce(Change(tenant, name, published.version, "publish"))
        else:  # a retried job: the version its first attempt published
            published = self.meta(name, published.version, tenant=tenant)
        return published

    def delete(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> int:
        """Deletes one version (or all with 0); returns how many were deleted."""
        meta_key = self._meta_key(tenant, name)
        try:
            deleted, orphaned = self._delete(keys=[meta_key], args=[str(version)])
            for raw in orphaned:
                sha = raw.decode() if isinstance(raw, bytes) else raw
                self._drop_blob(keys=[meta_key, self._blob_key(tenant, name, sha)], args=[sha])
            if not self.client.hexists(meta_key, "current"):
                # The hash itself stays, with its version counter: a version number is
                # never reused, so what a server cached under it can never go stale.
                self.client.zrem(self._index_key(tenant), name)
                if self.client.hexists(meta_key, "current"):  # published meanwhile: list it again
                    self.client.zadd(self._index_key(tenant), {name: 0})
        except RedisError as exc:
            raise store_error(exc) from exc
        if not deleted:
            what = f"version {version} of memory" if version else "memory"
            raise NotFound(f"{what} {name!r} does not exist (tenant {tenant!r})")
        self._announce(Change(tenant, name, version, "delete"))
        return int(deleted)

    def _announce(self, change: Change) -> None:
        message = json.dumps(change.__dict__)
        try:
            self.client.publish(CHANGES_CHANNEL, message)
        except RedisError:
            # The write itself succeeded; servers that missed the event resync when
            # their subscription reconnects.
            log.warning("could not announce %s", message)

    # --- reading ------------------------------------------------------------
    def current_version(self, name: str, *, tenant: str = DEFAULT_TENANT) -> int:
        try:
            version = self.client.hget(self._meta_key(tenant, name), "current")
        except RedisError as exc:
            raise store_error(exc) from exc
        if version is None:
            raise NotFound(f"memory {name!r} does not exist (tenant {tenant!r})")
        return int(version)

    def meta(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> MemoryMeta:
        """The metadata of a version (0 = current)."""
        version = version or self.current_version(name, tenant=tenant)
        try:
            text = self.client.hget(self._meta_key(tenant, name), f"v{version}")
        except RedisError as exc:
            raise store_error(exc) from exc
        if text is None:
            raise NotFound(f"memory {name!r} has no version {version} (tenant {tenant!r})")
        return replace(MemoryMeta.from_json(text), version=version)

    def published_by_job(self, name: str, job_id: str, *, tenant: str = DEFAULT_TENANT) -> int | None:
        """The version job `job_id` published of `name`, if it did."""
        try:
            version = self.client.hget(self._meta_key(tenant, name), f"job:{job_id}")
        except RedisError as exc:
            raise store_error(exc) from exc
        return int(version) if version is not None else None

    def versions(self, name: str, *, tenant: str = DEFAULT_TENANT) -> list[int]:
        try:
            fields = self.client.hkeys(self._meta_key(tenant, name))
        except RedisError as exc:
            raise store_error(exc) from exc
        names = (f.decode() if isinstance(f, bytes) else f for f in fields)
        return sorted(int(f[1:]) for f in names if f.startswith("v"))

    def load(self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT) -> Artifact:
        """The artifact, checked against its sha256 (DATA_LOSS when it does not match)."""
        meta = self.meta(name, version, tenant=tenant)
        try:
            blob = self.client.get(self._blob_key(tenant, name, meta.sha256))
        except RedisError as exc:
            raise store_error(exc) from exc
        if blob is None:
            raise DataLoss(f"memory {name!r} version {meta.version} has lost its blob; publish it again")
        return decode(meta, blob)

    def stored_bytes(self, tenant: str = DEFAULT_TENANT) -> int:
        """The bytes of the blobs the tenant's memories point at, each blob once (versions of
        the same content share one). Counted from the versions themselves, so it cannot drift
        from what is stored; a read of each memory's metadata, for the stored-bytes quota."""
        sizes: dict[tuple[str, str], int] = {}
        try:
            names = [
                n.decode() if isinstance(n, bytes) else n
                for n in self.client.zrange(self._index_key(tenant), 0, -1)
            ]
            for start in range(0, len(names), 256):
                batch = names[start : start + 256]
                pipe = self.client.pipeline(transaction=False)
                for name in batch:
                    pipe.hgetall(self._meta_key(tenant, name))
                for name, fields in zip(batch, pipe.execute(), strict=True):
                    for field, value in fields.items():
                        if (field.decode() if isinstance(field, bytes) else field).startswith("v"):
                            meta = json.loads(value)
                            sizes[(name, meta["sha256"])] = int(meta["size_bytes"])
        except RedisError as exc:
            raise store_error(exc) from exc
        return sum(sizes.values())

    def sweep_orphan_blobs(self) -> int:
        """Deletes every blob no version points at; returns how many. Versions before 0.1's atomic
        publish could leave one when a publish failed halfway; today's publishes cannot."""
        swept = 0
        try:
            for raw in self.client.scan_iter(match="memserve:m:{*}:blob:*", count=1000):
                key = raw.decode() if isinstance(raw, bytes) else raw
                tag, _, sha = key.rpartition(":blob:")
                meta_key = tag + ":meta"
                swept += int(self._drop_blob(keys=[meta_key, key], args=[sha]))
        except RedisError as exc:
            raise store_error(exc) from exc
        return swept

    def export_chunks(
        self, name: str, version: int = 0, *, tenant: str = DEFAULT_TENANT, chunk_bytes: int = 1 << 20
    ) -> tuple[MemoryMeta, Iterator[bytes]]:
        """The export file of a version, as chunks read from Redis one at a time (GETRANGE), so
        that an export costs one chunk of memory however large the memory and however slowly it
        is read. The blob's sha256 is checked as it streams: a mismatch (or a blob deleted
        meanwhile) ends the stream with DATA_LOSS after what was sent."""
        meta = self.meta(name, version, tenant=tenant)
        key = self._blob_key(tenant, name, meta.sha256)

        def read(start: int, end: int) -> bytes:
            try:
                return bytes(self.client.getrange(key, start, end - 1))
            except RedisError as exc:
                raise store_error(exc) from exc

        prefix = read(0, 8)
        if len(prefix) < 8:
            raise DataLoss(f"memory {name!r} version {meta.version} has lost its blob; publish it again")
        header = prefix + read(8, 8 + int.from_bytes(prefix, "little"))

        def chunks() -> Iterator[bytes]:
            digest = hashlib.sha256(header)
            yield export_header(meta, header)
            offset = len(header)
            while offset < meta.size_bytes:
                data = read(offset, min(offset + chunk_bytes, meta.size_bytes))
                if not data:
                    break
                digest.update(data)
                offset += len(data)
                yield data
            if offset != meta.size_bytes or digest.hexdigest() != meta.sha256:
                raise DataLoss(
                    f"memory {name!r} version {meta.version} changed or was deleted during the export, "
                    "or its blob is corrupted: the export is incomplete"
                )

        return meta, chunks()

    def list(
        self,
        *,
        tenant: str = DEFAULT_TENANT,
        kind: str = "",
        name_prefix: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> Page:
        """The current version of each memory, by name; `page_token` is the last name seen."""
        if page_size <= 0:
            raise InvalidArgument("page_size must be positive")
        low = f"({page_token}" if page_token else (f"[{name_prefix}" if name_prefix else "-")
        high = f"[{name_prefix}\xff" if name_prefix else "+"
        found: list[MemoryMeta] = []
        last = page_token
        try:
            while len(found) < page_size:
                names = self.client.zrangebylex(self._index_key(tenant), low, high, start=0, num=page_size)
                if not names:
                    return Page(found, "")
                for raw in names:
                    last = raw.decode() if isinstance(raw, bytes) else raw
                    try:
                        meta = self.meta(last, tenant=tenant)
                    except NotFound:  # deleted, or being published
                        continue
                    if not kind or meta.kind == kind:
                        found.append(meta)
                        if len(found) == page_size:
                            break
                low = f"({last}"
            more = self.client.zrangebylex(self._index_key(tenant), f"({last}", high, start=0, num=1)
        except RedisError as exc:
            raise store_error(exc) from exc
        return Page(found, last if more else "")


def parse_change(data: bytes | str) -> Change | None:
    try:
        fields = json.loads(data)
        return Change(str(fields["tenant"]), str(fields["name"]), int(fields["version"]), str(fields["op"]))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring a malformed change event: %r", data[:200])
        return None


def listen(
    client: RedisClient,
    handlers: dict[str, Callable[[bytes], None]],
    on_connect: Callable[[], None],
    stop: threading.Event,
) -> None:
    """Calls each channel's handler with each message until `stop` is set (blocking: run it in a thread).

    Reconnects by itself. Messages published while disconnected are lost, so
    `on_connect` runs each time the subscription is confirmed, the first time and
    after every reconnection (also one redis-py makes on its own, inside
    `get_message`): drop what may have gone stale. Give it a client without
    retries, so that a disconnection is seen at once.
    """
    first_channel = next(iter(handlers))
    delay = 0.1
    while not stop.is_set():
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(*handlers)
            while not stop.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message is None:
                    continue
                raw = message["channel"]
                channel = raw.decode() if isinstance(raw, bytes) else raw
                if message.get("type") == "subscribe" and channel == first_channel:
                    on_connect()
                    delay = 0.1
                elif message.get("type") == "message":
                    handlers[channel](message["data"])
        except RedisError as exc:
            log.warning("Redis events interrupted (%s); reconnecting", exc)
            stop.wait(delay)
            delay = min(delay * 2, 2.0)
        finally:
            with contextlib.suppress(RedisError):
                pubsub.close()


def wait_for_redis(client: RedisClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except RedisError as exc:
            if time.monotonic() > deadline:
                raise Unavailable(f"Redis did not answer within {timeout:.0f} s: {exc}") from exc
            time.sleep(0.05)
