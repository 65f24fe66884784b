"""What a call carries besides its message: the caller's tenant."""

from __future__ import annotations

import grpc

from memserve.api.auth import BOUND_TENANT, TENANT_METADATA
from memserve.names import DEFAULT_TENANT, check_tenant

__all__ = ["TENANT_METADATA", "tenant_of"]


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: the one its token is bound to (the auth check already refused a call
    that names another), else the `memserve-tenant` metadata, else the default tenant."""
    bound = BOUND_TENANT.get()
    if bound is not None:
        return bound
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA:
            return check_tenant(value if isinstance(value, str) else value.decode())
    return DEFAULT_TENANT
