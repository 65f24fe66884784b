"""The gRPC front: the server, the interceptor, protobuf conversion and one servicer per service.

Nothing past this package sees a wire type.
"""
