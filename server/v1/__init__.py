"""Generated gRPC stubs of the memserve.v1 API (see proto/). Do not edit: run
`python scripts/gen_protos.py`."""
