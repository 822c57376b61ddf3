"""Token authentication (call metadata) and TLS options for the gRPC server.

Clients send ``authorization: Bearer <token>``. A server that listens beyond
loopback requires a token unless started with ``--insecure-no-auth`` on
purpose; health checks stay open so load balancers can probe readiness.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc

from likeness.errors import InvalidInput

TOKEN_ENV = "LIKENESS_TOKEN"
# Health must answer without credentials: orchestrators probe it before they have any.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True)
class AuthConfig:
    # Shared secret clients send as "authorization: Bearer <token>"; empty = no auth.
    token: str = ""
    # PEM files for TLS; both or neither. Without them the port is plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    # Explicit opt-out for a non-loopback listener without a token (trusted networks only).
    insecure_no_auth: bool = False


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1, localhost and unix sockets."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_config(listen: str, config: AuthConfig) -> AuthConfig:
    """Refuse an unauthenticated non-loopback listener, and half a TLS pair."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidInput("TLS needs both --tls-cert and --tls-key (PEM files), or neither")
    for p in (config.tls_cert, config.tls_key):
        if p and not Path(p).is_file():
            raise InvalidInput(f"TLS file {p} does not exist")
    if not config.token and not config.insecure_no_auth and not is_loopback(listen):
        raise InvalidInput(
            f"refusing to listen on {listen} without authentication: set a token with --token TOKEN "
            f"or the {TOKEN_ENV} environment variable (clients send 'authorization: Bearer TOKEN'), "
            "listen on 127.0.0.1, or pass --insecure-no-auth on a trusted network"
        )
    return config


def token_from_env(explicit: str | None) -> str:
    return explicit if explicit else os.environ.get(TOKEN_ENV, "")


def server_credentials(config: AuthConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
    )


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        if handler_call_details.method in OPEN_METHODS:
            return continuation(handler_call_details)
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode()
        if not given:
            return self._deny_like(continuation, handler_call_details,
                                   "missing credentials: send metadata 'authorization: Bearer <token>'")
        if not hmac.compare_digest(given.encode(), self._expected):
            return self._deny_like(continuation, handler_call_details, "invalid token")
        return continuation(handler_call_details)

    @staticmethod
    def _deny_like(continuation: Callable[[Any], Any], details: Any, message: str) -> grpc.RpcMethodHandler:
        # Answer with a handler of the same streaming shape so the client sees a clean status.
        handler = continuation(details)

        def abort(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is None:
            return _deny(message)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(abort)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(abort)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                abort, request_deserializer=handler.request_deserializer)
        return grpc.unary_unary_rpc_method_handler(abort, request_deserializer=handler.request_deserializer)


class TokenCallCredentials(grpc.AuthMetadataPlugin):
    """Client side: adds the bearer token to every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)
