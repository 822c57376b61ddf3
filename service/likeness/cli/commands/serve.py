"""`likeness serve`: the gRPC service over one data directory."""

from __future__ import annotations

import argparse
import os

from likeness.cli.output import is_quiet, say, warn


def _serve(args: argparse.Namespace) -> int:
    import logging

    from likeness.serve.auth import AuthConfig, check_auth_config, token_from_env
    from likeness.serve.runtime import Limits, Runtime
    from likeness.serve.servicer import serve

    from likeness.errors import InvalidInput

    logging.basicConfig(level=logging.WARNING if is_quiet() else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.max_message_mb <= 2047:
        raise InvalidInput(f"--max-message-mb {args.max_message_mb}: use 1 to 2047 (gRPC's limit is 2 GiB)")
    auth = check_auth_config(args.listen, AuthConfig(
        token=token_from_env(args.token), tls_cert=args.tls_cert or "", tls_key=args.tls_key or "",
        insecure_no_auth=args.insecure_no_auth,
    ))
    from likeness.cli.commands.executor_options import executor_from_args

    runtime = Runtime(
        args.data, devices=args.device or None, import_roots=args.import_root or (),
        limits=Limits(max_message_bytes=args.max_message_mb * 1024 * 1024), default_profile=args.profile or "",
        executor=executor_from_args(args),
    )

    def bound(port: int, resumed: list[str]) -> None:
        host = args.listen.rsplit(":", 1)[0]
        # Tests and scripts read this line to learn the port when listening on :0.
        # Printed with -q too: it is serve's one result (scripts read the port from it).
        warn(f"likeness serving on {host}:{port} (data {runtime.store.data_dir}; "
            f"auth {'token' if auth.token else 'none'}; tls {'on' if auth.tls_cert else 'off'})")
        if resumed:
            say(f"resuming {len(resumed)} interrupted build(s): {', '.join(resumed)}")

    serve(args.listen, runtime, auth=auth, on_bound=bound)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC service (builds, generation, scoring)")
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port; port 0 picks a free one (default %(default)s)")
    p.add_argument("--data", default=os.environ.get("LIKENESS_DATA", "data"), help="data directory (SQLite + artifacts)")
    p.add_argument("--token", help="require 'authorization: Bearer TOKEN' (default: $LIKENESS_TOKEN)")
    p.add_argument("--tls-cert", help="PEM certificate chain for TLS")
    p.add_argument("--tls-key", help="PEM private key for TLS")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback listener without a token (trusted networks only)")
    p.add_argument("--import-root", action="append", help="folder clients may import galleries from (repeatable)")
    p.add_argument("--profile", help="default model profile (default: the best this machine has)")
    p.add_argument("--device", action="append", help="worker device, e.g. cuda:0 (repeatable; default: all GPUs or cpu)")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message in MiB (default %(default)s)")
    from likeness.cli.commands.executor_options import add_executor_options

    add_executor_options(p)
    p.set_defaults(func=_serve)
