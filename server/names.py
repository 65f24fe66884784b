"""The naming rules clients and servers share (no heavy imports: the client uses them)."""

from __future__ import annotations

import re

from memserve.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_TENANT = "default"


def check_name(name: str, what: str = "memory name") -> str:
    """`name` if it is a valid memory name or document id, else InvalidArgument (a ValueError)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"{what} {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(
            f"tenant {tenant!r} is not valid: use 1-63 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant
