"""Who may call what, for which tenant: bearer tokens bound to tenants and scopes.

Two sources, usable together:
- `$MEMSERVE_TOKEN`: one token for everything (every scope, any tenant the call names): the
  single-user setup.
- a tokens file (`--tokens-file`): each token bound to one tenant with scopes `read` (generate,
  read memories and jobs), `write` (register, put, delete, submit, cancel, evaluate) and `admin`
  (any tenant). A call with a tenant-bound token works in that tenant: naming another one is
  PERMISSION_DENIED, naming none means the token's. The file is read again when it changes
  (checked at most once a second), so tokens are added and revoked without a restart; a file
  that no longer parses keeps the previous tokens and is logged.

Reads need no token unless `--auth-reads`; with a tokens file and no `--auth-reads`, a call
without a token (or with one the server does not know: OpenAI's SDK sends its api_key to every
route) reads as before, in the tenant it names, so turn `--auth-reads` on for isolation.

Every call, with tokens or without, is also checked here for a well-formed tenant and counted
against its tenant's requests-per-second quota (`memserve.api.quotas`); the tokens file may set
tenants' quotas under "quotas", re-read with the tokens.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.api.quotas import Quota, Quotas, parse_quota
from memserve.errors import InvalidArgument, PermissionDenied, Unauthenticated
from memserve.names import DEFAULT_TENANT, check_tenant

log = logging.getLogger(__name__)

TENANT_METADATA = "memserve-tenant"
SCOPES = frozenset({"read", "write", "admin"})
# What changes the store or the jobs, or holds the server's compute for minutes (an evaluation).
MUTATING_RPCS = frozenset(
    {
        "Evaluate",
        "RegisterDocuments",
        "RegisterFacts",
        "RegisterAdapter",
        "PutMemory",
        "DeleteMemory",
        "SubmitJob",
        "CancelJob",
    }
)
RELOAD_CHECK_SECONDS = 1.0

BOUND_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "memserve_bound_tenant", default=None
)
"""The tenant the current call's token is bound to (None: the call names its own)."""


@dataclass(frozen=True)
class Grant:
    tenant: str | None
    """The tenant the token works in; None for the admin scope and $MEMSERVE_TOKEN (any)."""
    scopes: frozenset[str]


def _fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokensFile:
    grants: dict[bytes, Grant]
    quotas: dict[str, dict[str, Any]]
    """Tenants' own quotas, field by field over the server's defaults."""


def parse_tokens(text: str, source: str) -> dict[bytes, Grant]:
    return parse_tokens_file(text, source).grants


def parse_tokens_file(text: str, source: str) -> TokensFile:
    """A tokens file: {"tokens": [{"token": "…" or "sha256": "<hex of the token's sha256>",
    "tenant": "alice", "scopes": ["read", "write"]}, …], "quotas": {"alice": {"stored_bytes": …,
    "active_jobs": …, "requests_per_second": …}, …}} ("quotas" optional)."""
    try:
        data = json.loads(text)
        entries = data["tokens"]
        if not isinstance(entries, list):
            raise TypeError("tokens must be a list")
        quotas = data.get("quotas", {})
        if not isinstance(quotas, dict):
            raise TypeError("quotas must be an object of tenant: quota")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"{source}: not a tokens file ({exc}); see docs/operations.md") from None
    own = {
        check_tenant(tenant): parse_quota(quota, f"{source}: quotas.{tenant}")
        for tenant, quota in quotas.items()
    }
    return TokensFile(_grants(entries, source), own)


def _grants(entries: list[Any], source: str) -> dict[bytes, Grant]:
    grants: dict[bytes, Grant] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: tokens[{index}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where} is not an object")
        if isinstance(entry.get("token"), str) and len(entry["token"]) >= 16:
            key = _fingerprint(entry["token"])
        elif isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64:
            try:
                key = bytes.fromhex(entry["sha256"])
            except ValueError:
                raise InvalidArgument(f"{where}.sha256 is not hex") from None
        else:
            raise InvalidArgument(f"{where} needs a token of 16 characters or more, or its sha256 in hex")
        scopes = entry.get("scopes", ["read", "write"])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            raise InvalidArgument(f"{where}.scopes must be a non-empty list of {sorted(SCOPES)}")
        tenant = entry.get("tenant")
        if "admin" in scopes:
            tenant = None
        elif not isinstance(tenant, str):
            raise InvalidArgument(f"{where} needs a tenant (or the admin scope)")
        else:
            tenant = check_tenant(tenant)
        if key in grants:
            raise InvalidArgument(f"{where}: the same token appears twice")
        grants[key] = Grant(tenant, frozenset(scopes) | ({"read", "write"} if "admin" in scopes else set()))
    return grants


class Auth:
    """The server's credentials: checks each call, and says which tenant it works in."""

    def __init__(
        self,
        token: str | None = None,
        tokens_file: Path | None = None,
        auth_reads: bool = False,
        quota: Quota | None = None,
    ):
        self.token = token or None
        self.tokens_file = tokens_file
        self.auth_reads = auth_reads
        self.quotas = Quotas(quota)
        self._file = TokensFile({}, {})
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if tokens_file is not None:
            self._file = parse_tokens_file(Path(tokens_file).read_text(), str(tokens_file))
            self._stamp = _stamp(tokens_file)

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.tokens_file is not None

    def _current(self) -> TokensFile:
        """The tokens and quotas, re-read when the file changed (checked at most once a second)."""
        if self.tokens_file is None:
            return self._file
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return self._file
        with self._lock:
            self._checked = now
            try:
                stamp = _stamp(self.tokens_file)
                if stamp != self._stamp:
                    self._file = parse_tokens_file(Path(self.tokens_file).read_text(), str(self.tokens_file))
                    self._stamp = stamp
                    log.info("tokens file %s reloaded: %d tokens", self.tokens_file, len(self._file.grants))
            except (OSError, InvalidArgument) as exc:  # keep serving with the tokens we have
                log.error(
                    "tokens file %s not reloaded, keeping the previous tokens: %s", self.tokens_file, exc
                )
        return self._file

    def quota(self, tenant: str) -> Quota:
        """The tenant's quotas: its own in the tokens file, over the server's defaults."""
        return self.quotas.of(tenant, self._current().quotas)

    def authorize(self, metadata: Iterable[tuple[str, Any]] | None, rpc: str) -> str | None:
        """Checks the call's token for `rpc` and counts the call against its tenant's request
        rate; returns the tenant the token binds it to (None: the call's own). INVALID_ARGUMENT
        for a malformed tenant, UNAUTHENTICATED without a valid token where one is needed,
        PERMISSION_DENIED for a scope or a tenant the token lacks, RESOURCE_EXHAUSTED over the
        tenant's requests per second."""
        given, named = _read_metadata(metadata)
        bound = self._bound_tenant(given, named, rpc)
        tenant = bound or named or DEFAULT_TENANT
        self.quotas.rate.admit(tenant, self.quota(tenant).requests_per_second)
        return bound

    def _bound_tenant(self, given: str, named: str | None, rpc: str) -> str | None:
        if not self.enabled:
            return None
        writes = rpc in MUTATING_RPCS
        if not given:
            if writes or self.auth_reads:
                what = "changes the store" if writes else "needs a token on this server (--auth-reads)"
                raise Unauthenticated(f"{rpc} {what}: send a bearer token (token= or $MEMSERVE_TOKEN)")
            return None
        grant = self._grant(given)
        if grant is None:
            if not (writes or self.auth_reads):
                # Reads are open on this server, and OpenAI's SDK sends its api_key to every
                # route: an unknown token reads as a call without one.
                return None
            raise Unauthenticated(f"{rpc}: the bearer token is not one this server knows")
        needed = "write" if writes else "read"
        if needed not in grant.scopes:
            raise PermissionDenied(f"{rpc} needs the {needed!r} scope; this token has {sorted(grant.scopes)}")
        if grant.tenant is not None and named is not None and named != grant.tenant:
            raise PermissionDenied(f"this token works in tenant {grant.tenant!r}, not {named!r}")
        return grant.tenant

    def _grant(self, given: str) -> Grant | None:
        if self.token is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            return Grant(None, SCOPES)
        return self._current().grants.get(
            _fingerprint(given)
        )  # a dict lookup of a hash: no timing on the token


def _read_metadata(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, str | None]:
    given, named = "", None
    for key, value in metadata or ():
        text = value if isinstance(value, str) else bytes(value).decode(errors="replace")
        if key == "authorization" and text.startswith("Bearer "):
            given = text[len("Bearer ") :]
        elif key == TENANT_METADATA:
            named = check_tenant(text)
    return given, named


def _stamp(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size
