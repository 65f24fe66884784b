"""Where memories live: versioned artifacts on Redis and the server-side cache.

The store itself arrives with the store/jobs issue; until then the memory RPCs
answer UNIMPLEMENTED.
"""
