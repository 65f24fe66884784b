"""memserve: an LLM inference server with a pluggable neural memory layer."""

__version__ = "0.1.0"
