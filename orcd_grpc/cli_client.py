"""The connection flags of the CLI's client commands (generate, tokenize, score, load, unload, drain,
list, info) and the OrcdClient they make.

Each flag falls back to an environment variable. The client's TLS variables are named apart from
the server's (ORCD_TLS_CERT / ORCD_TLS_KEY / ORCD_TLS_CLIENT_CA are `orcd serve`'s), so one shell
can hold both.
"""
from __future__ import annotations

import argparse
import os

from . import security

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENV_ADDRESS = "ORCD_ADDRESS"
ENV_TLS = "ORCD_TLS"                      # "1": TLS with the system's root certificates
ENV_TLS_CA = "ORCD_TLS_CA"                # CA to trust (implies TLS)
ENV_TLS_CLIENT_CERT = "ORCD_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY = "ORCD_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "ORCD_TLS_SERVER_NAME"
CLIENT_ENV = (ENV_ADDRESS, ENV_TLS, ENV_TLS_CA, ENV_TLS_CLIENT_CERT, ENV_TLS_CLIENT_KEY, ENV_TLS_SERVER_NAME)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def add_client_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ
    p.add_argument("--address", default=env.get(ENV_ADDRESS, DEFAULT_ADDRESS),
                   help=f"worker address host:port (default: ${ENV_ADDRESS} or %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--auth-token", default=env.get(security.ENV_TOKEN),
                   help=f"bearer token to send (default: ${security.ENV_TOKEN})")
    tls = p.add_argument_group("TLS (a worker reachable from other machines serves only TLS)")
    tls.add_argument("--tls", action="store_true", default=_truthy(env.get(ENV_TLS)),
                     help=f"connect with TLS, trusting the system's root certificates (env {ENV_TLS}=1)")
    tls.add_argument("--tls-ca", metavar="PEM", default=env.get(ENV_TLS_CA) or None,
                     help=f"connect with TLS, trusting this CA certificate (env {ENV_TLS_CA})")
    tls.add_argument("--tls-client-cert", metavar="PEM", default=env.get(ENV_TLS_CLIENT_CERT) or None,
                     help=f"client certificate chain for mutual TLS (env {ENV_TLS_CLIENT_CERT})")
    tls.add_argument("--tls-client-key", metavar="PEM", default=env.get(ENV_TLS_CLIENT_KEY) or None,
                     help=f"private key of --tls-client-cert (env {ENV_TLS_CLIENT_KEY})")
    tls.add_argument("--tls-server-name", metavar="NAME", default=env.get(ENV_TLS_SERVER_NAME) or None,
                     help="name the server certificate must carry, when it is not the address's host "
                          f"(env {ENV_TLS_SERVER_NAME})")
    tls.add_argument("--insecure", action="store_true",
                     help="allow sending --auth-token in plaintext to a non-loopback address "
                          "(refused otherwise)")


def client_from_args(args: argparse.Namespace):
    """The OrcdClient the flags describe. Raises client_errors.ClientConfigError (a ValueError)
    for TLS flags that do not fit together or files that cannot be read, and for a token that
    would travel in plaintext to another machine."""
    from .client import OrcdClient

    metadata = [("authorization", f"Bearer {args.auth_token}")] if args.auth_token else None
    return OrcdClient(args.address, timeout=args.timeout, metadata=metadata, tls=args.tls,
                      tls_ca=args.tls_ca, tls_cert=args.tls_client_cert, tls_key=args.tls_client_key,
                      tls_server_name=args.tls_server_name, insecure=args.insecure)
