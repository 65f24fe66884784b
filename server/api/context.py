"""What a call carries besides its message: the caller's tenant."""

from __future__ import annotations

import grpc

from memserve.names import DEFAULT_TENANT, check_tenant

TENANT_METADATA = "memserve-tenant"


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: the `memserve-tenant` metadata, else the default tenant."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA:
            return check_tenant(value if isinstance(value, str) else value.decode())
    return DEFAULT_TENANT
