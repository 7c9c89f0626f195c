"""How the Python clients open their channel to a worker: plaintext, TLS or mutual TLS, and
whether a bearer token may travel on it.

A worker reachable from other machines serves TLS (security.check_exposure), so a client must
be able to trust its CA and, for mutual TLS, present a certificate. A bearer token sent in
plaintext to such an address can be read on the way; the clients refuse to send one unless the
caller says `insecure` (a private network the operator trusts, as the server's --insecure).
"""
from __future__ import annotations

import dataclasses
import os

import grpc

from .client_errors import ClientConfigError


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """tls: TLS with the system's root certificates. ca: PEM of the CA to trust instead (a path,
    or the PEM bytes); giving it implies TLS. cert/key: the client certificate chain and its
    private key, for mutual TLS (both or neither). server_name: the name the server's
    certificate must carry, when it differs from the address's host."""

    tls: bool = False
    ca: str | bytes | os.PathLike | None = None
    cert: str | bytes | os.PathLike | None = None
    key: str | bytes | os.PathLike | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tls or self.ca or self.cert or self.key)


def _pem(value, what: str, marker: bytes) -> bytes | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        data = value
    else:
        try:
            with open(value, "rb") as f:
                data = f.read(1 << 20)
        except OSError as exc:
            raise ClientConfigError(f"{what}: cannot read {os.fspath(value)!r}: {exc.strerror}") from None
    # gRPC only notices a bad PEM when it connects, and then says UNAVAILABLE: check it here.
    if b"-----BEGIN " not in data or marker not in data:
        raise ClientConfigError(f"{what}: not a PEM {marker.decode().lower()} file")
    return data


def channel_credentials(opts: TlsOptions) -> grpc.ChannelCredentials | None:
    """The TLS credentials for `opts`; None for plaintext."""
    if not opts.enabled:
        if opts.server_name:
            raise ClientConfigError("tls_server_name (--tls-server-name) needs TLS: --tls, --tls-ca or a "
                                    "client certificate")
        return None
    if bool(opts.cert) != bool(opts.key):
        raise ClientConfigError("the client certificate and its key (tls_cert and tls_key, --tls-client-cert and "
                                "--tls-client-key) must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(opts.ca, "tls_ca (--tls-ca)", b"CERTIFICATE"),
        private_key=_pem(opts.key, "tls_key (--tls-client-key)", b"PRIVATE KEY"),
        certificate_chain=_pem(opts.cert, "tls_cert (--tls-client-cert)", b"CERTIFICATE"))


def channel_options(opts: TlsOptions) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", opts.server_name)] if opts.server_name else []


def address_host(address: str) -> str | None:
    """The host of a gRPC target ("host:port", "[v6]:port", "dns:///host:port"); None for a Unix
    socket, which only this machine can reach."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):].split(",")[0]
            break
    if target.startswith("["):
        return target[1:].split("]")[0]
    if target.count(":") == 1:
        return target.rsplit(":", 1)[0]
    return target  # no port, or a bare IPv6 address


def check_token_transport(address: str, metadata, opts: TlsOptions, insecure: bool) -> None:
    """Refuses a bearer token in plaintext to an address other machines may see."""
    from .security import is_loopback

    if opts.enabled or insecure or not any(str(k).lower() == "authorization" for k, _ in metadata):
        return
    host = address_host(address)
    if host is None or is_loopback(host):
        return
    raise ClientConfigError(
        f"refusing to send a bearer token in plaintext to {address} (not a loopback address); "
        f"use TLS (--tls-ca PEM or --tls), or pass --insecure if the network is trusted")


def open_channel(address: str, opts: TlsOptions, *, aio: bool = False):
    """A sync (or grpc.aio) channel to `address` with the TLS settings of `opts`."""
    creds = channel_credentials(opts)
    options = channel_options(opts)
    mod = grpc.aio if aio else grpc
    if creds is None:
        return mod.insecure_channel(address, options=options)
    return mod.secure_channel(address, creds, options=options)
