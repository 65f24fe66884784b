"""The memory layer: the kind interface, the registry, the model hooks, the cache and the store runtime."""
