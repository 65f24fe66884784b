"""The engine: the scheduler thread with continuous batching, the KV cache, sampling, detokenizing."""
