"""TLS for both protocols: the server's certificate and key, and optionally the CA whose client
certificates it requires (mutual TLS). Read and checked once at start, so a wrong path or a key
that does not match its certificate is one clear error before anything listens."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    """PEM certificate chain the server presents (its own first)."""
    key: Path
    """PEM private key of the certificate."""
    client_ca: Path | None = None
    """PEM CA bundle: when set, every client must present a certificate it signed (mutual TLS)."""

    def __post_init__(self) -> None:
        for what, path in (
            ("--tls-cert", self.cert),
            ("--tls-key", self.key),
            ("--tls-client-ca", self.client_ca),
        ):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what}: no file at {path}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise ValueError(
                f"--tls-cert/--tls-key: not a PEM certificate and its key ({exc.reason})"
            ) from exc
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as exc:
                raise ValueError(f"--tls-client-ca: not a PEM CA bundle ({exc.reason})") from exc

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=None if self.client_ca is None else Path(self.client_ca).read_bytes(),
            require_client_auth=self.mutual,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config's keyword arguments for the same certificate and client check."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options
