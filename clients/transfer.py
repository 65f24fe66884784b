"""Moving memory files: the chunks of an upload, and the sinks an export is written to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from memserve.v1 import memory_pb2

# The server streams exports in 1 MiB chunks; uploads use the same size.
UPLOAD_CHUNK_BYTES = 1 << 20


def _byte_chunks(data: bytes, name: str) -> Iterator[memory_pb2.MemoryChunk]:
    """`data` in chunks; only the first names the memory."""
    # At least one chunk goes, even for no data, so the server can say what is missing.
    for offset in range(0, max(len(data), 1), UPLOAD_CHUNK_BYTES):
        piece = data[offset : offset + UPLOAD_CHUNK_BYTES]
        yield memory_pb2.MemoryChunk(name="" if offset else name, data=piece)


def _file_chunks(file: BinaryIO, name: str) -> Iterator[memory_pb2.MemoryChunk]:
    first = True
    while (data := file.read(UPLOAD_CHUNK_BYTES)) or first:
        yield memory_pb2.MemoryChunk(name=name if first else "", data=data)
        first = False


class FileUpload:
    """The chunks of an export file on disk, opened at once (an error inside the request stream
    would be lost) and closed after the call."""

    def __init__(self, path: str | os.PathLike[str], name: str) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        self.chunks = _file_chunks(self.file, name)

    def __enter__(self) -> Iterator[memory_pb2.MemoryChunk]:
        return self.chunks

    def __exit__(self, *exc: object) -> None:
        self.file.close()


class BytesSink:
    """Collects an export in memory."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def __enter__(self) -> BytesSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add(self, data: bytes) -> None:
        self.pieces.append(data)

    def result(self) -> bytes:
        return b"".join(self.pieces)


class FileSink:
    """Writes an export to a temporary file next to `path` that replaces it only once complete."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.target = Path(path)
        self.partial = self.target.with_name(self.target.name + ".part")
        self.size = 0

    def __enter__(self) -> FileSink:
        self.file = open(self.partial, "wb")  # closed by __exit__ (or result)
        return self

    def add(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def result(self) -> int:
        """The file's size in bytes, once it is in place."""
        self.file.close()
        os.replace(self.partial, self.target)
        return self.size

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)  # a failed export leaves no half-written file
