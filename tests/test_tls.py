"""TLS and mutual TLS on both protocols, with certificates made here: a client that does not trust
the server's CA is refused, one that does is served, over gRPC (the Python client and the CLI)
and HTTP (the `openai` package); a mutual-TLS server refuses a client without a certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from memserve.api.tls import TlsConfig
from memserve.clients import Client
from memserve.clients.cli import main
from memserve.clients.errors import MemserveError
from tests.test_server import ServerThread, tiny_server_config

pytestmark = pytest.mark.usefixtures("no_ambient_tenant")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: Pair
    client: Pair
    stranger_ca: Path
    """A CA that signed nothing here: trusting only it must not reach the server."""
    stranger_client: Pair
    """A client certificate from the stranger CA."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Pair:
    pair = Pair(path.with_suffix(".crt"), path.with_suffix(".key"))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pair


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def make_certificates(directory: Path) -> Certificates:
    ca_key, ca_cert = _issue("memserve test CA", None, ca=True)
    stranger_key, stranger_cert = _issue("some other CA", None, ca=True)
    host = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue(
        "localhost", (ca_cert.subject, ca_key), names=host, usage=x509.ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _issue("a client", (ca_cert.subject, ca_key), usage=x509.ExtendedKeyUsageOID.CLIENT_AUTH)
    outsider = _issue(
        "an outsider", (stranger_cert.subject, stranger_key), usage=x509.ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Certificates(
        ca=_write(directory / "ca", ca_key, ca_cert).cert,
        server=_write(directory / "server", *server),
        client=_write(directory / "client", *client),
        stranger_ca=_write(directory / "stranger-ca", stranger_key, stranger_cert).cert,
        stranger_client=_write(directory / "outsider", *outsider),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _serve(tiny_llama_dir: Path, tls: TlsConfig) -> ServerThread:
    return ServerThread(replace(tiny_server_config(tiny_llama_dir), http_port=0, tls=tls))


@pytest.fixture(scope="module")
def tls_server(tiny_llama_dir: Path, certs: Certificates) -> Iterator[ServerThread]:
    server = _serve(tiny_llama_dir, TlsConfig(certs.server.cert, certs.server.key))
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_server(tiny_llama_dir: Path, certs: Certificates) -> Iterator[ServerThread]:
    server = _serve(tiny_llama_dir, TlsConfig(certs.server.cert, certs.server.key, client_ca=certs.ca))
    yield server
    server.close()


def grpc_address(server: ServerThread) -> str:
    return f"localhost:{server.running.port}"


def https_url(server: ServerThread) -> str:
    return f"https://localhost:{server.running.http_port}"


def trusting(ca: Path | None, client: Pair | None = None) -> ssl.SSLContext:
    """A client-side SSL context: trusts `ca` (None: the system's roots), presents `client`."""
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def generate(address: str, **tls: object) -> str:
    with Client(address, timeout=30, **tls) as client:  # type: ignore[arg-type]
        return client.generate("Once upon a time", max_new_tokens=3, temperature=0).text


def test_grpc_with_the_ca_is_served_and_without_it_refused(tls_server, certs):
    address = grpc_address(tls_server)
    assert generate(address, ca=certs.ca)
    for refused in ({"tls": True}, {"ca": certs.stranger_ca}, {"tls": False}):
        with pytest.raises(MemserveError) as caught:
            generate(address, **refused)
        assert caught.value.status is grpc.StatusCode.UNAVAILABLE, refused


def test_http_with_the_ca_is_served_and_without_it_refused(tls_server, certs):
    url = https_url(tls_server)
    with httpx.Client(verify=trusting(certs.ca)) as http:
        assert http.get(f"{url}/health").status_code == 200
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0) as oai:
            model = oai.models.list().data[0].id
            completion = oai.completions.create(
                model=model, prompt="Once upon a time", max_tokens=3, temperature=0
            )
    assert completion.choices[0].text == generate(grpc_address(tls_server), ca=certs.ca)
    for ca in (None, certs.stranger_ca):
        with (
            httpx.Client(verify=trusting(ca)) as http,
            pytest.raises(httpx.ConnectError, match="CERTIFICATE"),
        ):
            http.get(f"{url}/health")
    with httpx.Client() as http, pytest.raises(httpx.HTTPError):  # plaintext to a TLS port
        http.get(f"http://localhost:{tls_server.running.http_port}/health")


def test_mutual_tls_wants_a_certificate_from_the_servers_ca(mtls_server, certs):
    address = grpc_address(mtls_server)
    assert generate(address, ca=certs.ca, client_cert=certs.client.cert, client_key=certs.client.key)
    outsider = {"client_cert": certs.stranger_client.cert, "client_key": certs.stranger_client.key}
    for refused in ({}, outsider):
        with pytest.raises(MemserveError) as caught:
            generate(address, ca=certs.ca, **refused)
        assert caught.value.status is grpc.StatusCode.UNAVAILABLE, refused

    url = https_url(mtls_server)
    with httpx.Client(verify=trusting(certs.ca, certs.client)) as http:
        assert http.get(f"{url}/ready").status_code == 200
    for client in (None, certs.stranger_client):
        with httpx.Client(verify=trusting(certs.ca, client)) as http, pytest.raises(httpx.HTTPError):
            http.get(f"{url}/ready")


def test_the_cli_takes_the_ca_by_flag_and_by_environment(tls_server, mtls_server, certs, monkeypatch, capsys):
    address = grpc_address(tls_server)
    assert main(["generate", "--server", address, "--ca", str(certs.ca), "--max-new-tokens", "2", "Hi"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--server", address, "--max-new-tokens", "2", "Hi"]) == 1
    refused = capsys.readouterr().err
    assert "UNAVAILABLE" in refused or "no memserve server" in refused

    monkeypatch.setenv("MEMSERVE_CA", str(certs.ca))
    monkeypatch.setenv("MEMSERVE_CLIENT_CERT", str(certs.client.cert))
    monkeypatch.setenv("MEMSERVE_CLIENT_KEY", str(certs.client.key))
    assert main(["generate", "--server", grpc_address(mtls_server), "--max-new-tokens", "2", "Hi"]) == 0
    assert capsys.readouterr().out.strip()


def test_bad_certificate_files_are_one_clear_error(certs, tmp_path):
    with pytest.raises(ValueError, match="no file at"):
        TlsConfig(tmp_path / "missing.crt", certs.server.key)
    with pytest.raises(ValueError, match="certificate and its key"):
        TlsConfig(certs.server.cert, certs.client.key)  # a key of another certificate
    with pytest.raises(ValueError, match="client certificate needs its key"):
        Client("localhost:1", client_cert=certs.client.cert)
    with pytest.raises(ValueError, match="cannot read the CA"):
        Client("localhost:1", ca=tmp_path / "missing.pem")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "x.crt"], "needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "ca.crt"], "mutual TLS is TLS first"),
    ],
)
def test_serve_refuses_half_a_tls_setup(flags, message, capsys):
    assert main(["serve", "--model", "unused", *flags]) == 1
    assert message in capsys.readouterr().err
