"""TLS for real: a self-signed certificate (openssl CLI), a TLS server on port 0, health and an
authenticated call through LikenessClient(tls_ca=...), and plaintext refused by the TLS port.
No models are needed: the runtime is marked ready without loading them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from likeness.serve.auth import AuthConfig
from likeness.serve.client import LikenessClient
from likeness.serve.runtime import Runtime
from likeness.serve.servicer import create_server, mark_serving_when_ready
from likeness.spec import spec_from_dict

TOKEN = "tls-t0ken"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return crt, key


@pytest.fixture()
def tls_server(tmp_path, cert):
    crt, key = cert
    rt = Runtime(tmp_path / "data", devices=["cpu"], start_workers=False)
    server, port, health = create_server("127.0.0.1:0", rt,
                                         auth=AuthConfig(token=TOKEN, tls_cert=str(crt), tls_key=str(key)))
    server.start()
    rt.start(load_models=False)
    mark_serving_when_ready(rt, health)
    yield f"127.0.0.1:{port}", crt
    server.stop(0)
    rt.stop()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_round_trip_health_and_authenticated_call(tls_server):
    addr, crt = tls_server
    with LikenessClient(addr, token=TOKEN, tls_ca=str(crt), timeout=30) as c:
        c.wait_ready(30)
        spec = spec_from_dict({"name": "Emily", "token": "3m1ly", "traits": ["red curly hair"]})
        assert c.create_character(spec).name == "Emily"
        assert [x.name for x in c.list_characters()] == ["Emily"]
        # Health needs no token, over TLS too.
        ch = grpc.secure_channel(addr, grpc.ssl_channel_credentials(crt.read_bytes()))
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        ch.close()
    # TLS without (or with a wrong) token is still refused.
    with LikenessClient(addr, tls_ca=str(crt), timeout=30) as anon:
        assert _code(anon.list_characters) == grpc.StatusCode.UNAUTHENTICATED
    with LikenessClient(addr, token="wrong", tls_ca=str(crt), timeout=30) as bad:
        assert _code(bad.list_characters) == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_and_untrusted_clients_are_refused(tls_server, tmp_path):
    addr, crt = tls_server
    # Plaintext to the TLS port: the handshake fails; no call reaches the service.
    with LikenessClient(addr, token=TOKEN, timeout=10) as plain:
        assert _code(plain.list_characters) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the certificate refuses the server.
    other = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    with LikenessClient(addr, token=TOKEN, tls_ca=str(other), timeout=10) as untrusted:
        assert _code(untrusted.list_characters) == grpc.StatusCode.UNAVAILABLE
