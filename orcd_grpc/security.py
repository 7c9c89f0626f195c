"""Who may talk to the worker: TLS / mutual TLS credentials, bearer tokens, and the exposure policy.

Access model (docs/reliability.md has the operator's version):
  * Transport: TLS when --tls-cert/--tls-key are given; with --tls-client-ca the server also
    demands a client certificate signed by that CA (mutual TLS) and refuses the handshake
    otherwise.
  * Calls: with tokens configured every RPC except health and reflection needs
    "authorization: Bearer <token>". No header: UNAUTHENTICATED. A token that is not one of the
    configured ones: PERMISSION_DENIED. Tokens are compared in constant time, against every
    configured token, so timing reveals neither a prefix nor which token was close.
  * Exposure: with neither TLS nor tokens the server only starts on a loopback address;
    anything else needs TLS and a token, or an explicit --insecure.

Each token may carry a client id ("secret:alice"); the id names the caller in rate limits, usage
counters and logs, so the secret itself is never logged or used as a metric label.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import socket
from typing import Callable, Iterable, Mapping

import grpc

#: Methods any caller may use: load balancers and orchestrators probe health without credentials,
#: and reflection only describes the API (it exposes no data).
OPEN_METHOD_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

#: The authenticated client id of the call being handled (set by AuthInterceptor on the handler's
#: thread, read by the rate limiter and anything else that wants to know who is calling).
CALL_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("orcd_call_client", default=None)

ENV_CERT, ENV_KEY, ENV_CLIENT_CA = "ORCD_TLS_CERT", "ORCD_TLS_KEY", "ORCD_TLS_CLIENT_CA"
ENV_TOKENS, ENV_INSECURE = "ORCD_AUTH_TOKENS", "ORCD_INSECURE"
ENV_TOKEN = "ORCD_AUTH_TOKEN"  # the single token the CLI's clients send and the server also accepts


class ExposureError(ValueError):
    """The server would listen beyond this machine without TLS and authentication."""


@dataclasses.dataclass
class SecurityConfig:
    tls_cert: str | None = None       # PEM certificate chain of the server
    tls_key: str | None = None        # PEM private key of the server
    tls_client_ca: str | None = None  # PEM CA bundle; set: clients must present a certificate it signed
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # bearer token -> client id
    insecure: bool = False            # allow a non-loopback listener without TLS + token

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def mtls(self) -> bool:
        return self.tls and bool(self.tls_client_ca)


# ---- configuration -----------------------------------------------------------------------------


def parse_tokens(specs: str | Iterable[str] | None) -> dict[str, str]:
    """Parses "tok1:alice,tok2" (or a list of such strings) into {token: client id}.

    A token given without an id gets "token-<8 hex of its sha256>": stable across restarts, and it
    does not reveal the token.
    """
    if specs is None:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    out: dict[str, str] = {}
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            token, sep, client = item.rpartition(":") if ":" in item else (item, "", "")
            token, client = token.strip(), client.strip()
            if not token:
                raise ValueError(f"--auth-token: entry {item!r} has an empty token")
            if any(c.isspace() for c in token):
                raise ValueError("--auth-token: tokens may not contain whitespace")
            if sep and not client:
                raise ValueError(f"--auth-token: entry for token ending {token[-4:]!r} has an empty client id")
            if len(token) < 16:
                raise ValueError("--auth-token: tokens must be at least 16 characters "
                                 "(short tokens can be guessed)")
            client = client or "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
            if token in out and out[token] != client:
                raise ValueError(f"--auth-token: one token is listed for two client ids ({out[token]}, {client})")
            out[token] = client
    return out


def add_arguments(parser) -> None:
    """Adds --tls-cert, --tls-key, --tls-client-ca, --auth-token and --insecure to `parser`
    (an argparse parser or group). Defaults come from the environment at parse time. An option
    the parser already has (the CLI's own --auth-token) is left as it is; config_from_args reads
    either form."""
    have = getattr(parser, "_option_string_actions", {})
    parser.add_argument("--tls-cert", default=None, metavar="PEM",
                        help=f"serve TLS with this certificate chain (env {ENV_CERT})")
    parser.add_argument("--tls-key", default=None, metavar="PEM",
                        help=f"private key of --tls-cert (env {ENV_KEY})")
    parser.add_argument("--tls-client-ca", default=None, metavar="PEM",
                        help=f"require client certificates signed by this CA: mutual TLS (env {ENV_CLIENT_CA})")
    if "--auth-token" not in have:
        parser.add_argument("--auth-token", action="append", default=None, metavar="TOKEN[:CLIENT]",
                            help="require 'authorization: Bearer TOKEN'; repeat or comma-separate for several, "
                                 f"optionally naming each client (env {ENV_TOKENS})")
    if "--insecure" not in have:
        parser.add_argument("--insecure", action="store_true", default=None,
                            help="allow listening on a non-loopback address without TLS and a token")


def config_from_args(args, environ: Mapping[str, str] | None = None) -> SecurityConfig:
    """A SecurityConfig from parsed flags, falling back to the environment for each unset flag.

    Raises ValueError when the settings are inconsistent (a cert without its key, a CA without TLS)
    or a file is unreadable, so the process stops before it binds anything.
    """
    env = os.environ if environ is None else environ

    def pick(name, var):
        v = getattr(args, name, None)
        return v if v else (env.get(var) or None)

    token_specs = getattr(args, "auth_token", None)
    if isinstance(token_specs, str):
        token_specs = [token_specs]
    if not token_specs:
        token_specs = [s for s in (env.get(ENV_TOKENS), env.get(ENV_TOKEN)) if s]
    insecure = getattr(args, "insecure", None)
    if insecure is None:
        insecure = env.get(ENV_INSECURE, "").strip().lower() in ("1", "true", "yes", "on")
    cfg = SecurityConfig(tls_cert=pick("tls_cert", ENV_CERT), tls_key=pick("tls_key", ENV_KEY),
                         tls_client_ca=pick("tls_client_ca", ENV_CLIENT_CA), tokens=parse_tokens(token_specs),
                         insecure=bool(insecure))
    validate_config(cfg)
    return cfg


def validate_config(cfg: SecurityConfig) -> None:
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if cfg.tls_client_ca and not cfg.tls:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
    for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key),
                       ("--tls-client-ca", cfg.tls_client_ca)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: {path} is not a readable file")


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS server credentials, requiring client certificates when a client CA is set; None: plaintext."""
    if not cfg.tls:
        return None
    validate_config(cfg)

    def read(flag, path):
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
        if b"-----BEGIN" not in data:
            raise ValueError(f"{flag}: {path} is not PEM")
        return data

    cert, key = read("--tls-cert", cfg.tls_cert), read("--tls-key", cfg.tls_key)
    ca = read("--tls-client-ca", cfg.tls_client_ca) if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def add_port(server: grpc.Server, address: str, cfg: SecurityConfig) -> int:
    """Binds `address` ("host:port") with TLS when configured; returns the port (0: failed)."""
    creds = server_credentials(cfg)
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


# ---- exposure policy ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine. "" / "0.0.0.0" / "::" listen
    everywhere; names are resolved and must map only to loopback addresses."""
    h = host.strip().strip("[]")
    if h in ("", "0.0.0.0", "::", "*"):
        return False
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(h, None)}
    except OSError:
        return False  # cannot tell: treat as exposed
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_exposure(host: str, tls: bool, tokens, insecure: bool) -> None:
    """Refuses a listener reachable from other machines unless it has TLS and bearer tokens.

    Loopback listeners may run without either (local development, a sidecar). `insecure`
    overrides the refusal for deliberate setups (a private network, TLS terminated by a proxy).
    """
    if insecure or is_loopback(host):
        return
    missing = [what for what, ok in (("TLS (--tls-cert/--tls-key)", tls), ("a bearer token (--auth-token)",
                                                                            bool(tokens))) if not ok]
    if missing:
        raise ExposureError(
            f"refusing to listen on {host or '0.0.0.0'} (reachable from other machines) without "
            f"{' and '.join(missing)}; configure them, listen on 127.0.0.1, or pass --insecure")


# ---- bearer tokens -----------------------------------------------------------------------------


class TokenChecker:
    """Looks up a bearer token in constant time with respect to the configured tokens."""

    def __init__(self, tokens: Mapping[str, str]):
        # Compare fixed-length digests: hmac.compare_digest is constant-time only for equal
        # lengths, and the digest hides the configured tokens' lengths as well.
        self._entries = [(hashlib.sha256(t.encode()).digest(), c) for t, c in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def client_for(self, token: str) -> str | None:
        d = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, client in self._entries:  # no early exit: every token is compared
            if hmac.compare_digest(d, digest):
                found = client
        return found


def _metadata_value(md, key: str) -> str | None:
    for k, v in md or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def authenticate(checker: TokenChecker, metadata) -> tuple[grpc.StatusCode, str] | str:
    """The caller's client id, or (status, message) to answer with."""
    auth = _metadata_value(metadata, "authorization")
    if auth is None or not auth.strip():
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: bearer token missing (send 'authorization: Bearer <token>')"
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>'"
    client = checker.client_for(token.strip())
    if client is None:
        return grpc.StatusCode.PERMISSION_DENIED, "authorization: bearer token is not valid"
    return client


def wrap_handler(handler: grpc.RpcMethodHandler, unary_wrap: Callable, stream_wrap: Callable):
    """Returns `handler` with its behaviour replaced by unary_wrap(fn) / stream_wrap(fn).

    Server interceptors run on gRPC's polling thread, without the call's context; wrapping the
    behaviour instead runs the check on the handler's own thread, with `context` available (peer,
    TLS auth context, abort with trailing metadata) and context variables that reach the servicer.
    """
    h = handler
    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_wrap(h.unary_unary), h.request_deserializer,
                                                   h.response_serializer)
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_wrap(h.unary_stream), h.request_deserializer,
                                                    h.response_serializer)
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_wrap(h.stream_unary), h.request_deserializer,
                                                    h.response_serializer)
    if h.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream_wrap(h.stream_stream), h.request_deserializer,
                                                     h.response_serializer)
    return handler


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks "authorization: Bearer <token>" on every method outside OPEN_METHOD_PREFIXES and
    publishes the caller's client id in CALL_CLIENT for the handler (and the rate limiter).

    CALL_CLIENT is set at the start of every checked call, so a value left on a pool thread by an
    abandoned stream can never be read as the identity of a later call.
    """

    def __init__(self, tokens: Mapping[str, str], open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        self._checker = TokenChecker(tokens)
        self._open = open_prefixes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not self._checker or handler_call_details.method.startswith(self._open):
            return handler
        verdict = authenticate(self._checker, handler_call_details.invocation_metadata)

        def unary_wrap(fn):
            def inner(request, context):
                if not isinstance(verdict, str):
                    context.abort(*verdict)
                CALL_CLIENT.set(verdict)
                return fn(request, context)
            return inner

        def stream_wrap(fn):
            def inner(request, context):
                if not isinstance(verdict, str):
                    context.abort(*verdict)
                CALL_CLIENT.set(verdict)
                yield from fn(request, context)
            return inner

        return wrap_handler(handler, unary_wrap, stream_wrap)


def peer_common_name(context) -> str | None:
    """CN of the verified client certificate (mutual TLS), else None."""
    try:
        auth = context.auth_context() or {}
    except Exception:
        return None
    cn = auth.get("x509_common_name")
    if cn:
        v = cn[0]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


def peer_host(context) -> str:
    """The peer's address without the port: "ipv4:10.0.0.7:51234" -> "10.0.0.7" (one client
    reconnecting from a new port stays one client)."""
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]").replace("%25", "%")
    return peer


def client_identity(context, metadata=None) -> str:
    """Whom a call is accounted to, strongest proof first: the bearer token's client id, the
    verified client certificate's CN, the self-declared x-client-id header, the peer's address.

    A declared x-client-id never overrides a verified identity (it would let one token holder
    spend another's quota); without one it only separates callers who cooperate."""
    client = CALL_CLIENT.get()
    if client:
        return client
    cn = peer_common_name(context)
    if cn:
        return f"cn:{cn}"
    md = metadata if metadata is not None else (context.invocation_metadata() or ())
    declared = _metadata_value(md, "x-client-id")
    if declared:
        declared = "".join(ch for ch in declared.strip() if ch.isprintable())[:64]
        if declared:
            return f"id:{declared}"
    return f"peer:{peer_host(context)}"


def build_interceptors(cfg: SecurityConfig) -> list[grpc.ServerInterceptor]:
    """The interceptors the server should install for `cfg` (empty without tokens)."""
    return [AuthInterceptor(cfg.tokens)] if cfg.tokens else []


def apply_to_server_config(config, sec: SecurityConfig, limits=None):
    """Fills a server.ServerConfig's hooks from `sec` (and optional ratelimit.RateLimits):
    refuses an exposed plaintext/unauthenticated listener (ExposureError), sets `credentials`,
    and appends the auth interceptor and the rate-limit/usage interceptor to `interceptors`.

    A token already in config.auth_token (the CLI's single-token flag) joins the configured tokens
    under client id "default" and config.auth_token is cleared, so that one interceptor checks
    every token and the call is not authenticated twice.
    """
    from . import ratelimit

    tokens = dict(sec.tokens)
    if getattr(config, "auth_token", None):
        tokens.setdefault(config.auth_token, "default")
        config.auth_token = None
    check_exposure(config.host, sec.tls, tokens, sec.insecure)
    config.credentials = server_credentials(sec)
    if tokens:
        config.interceptors.append(AuthInterceptor(tokens))
    # Usage is counted even without limits; the server binds the counters to its registry.
    config.interceptors.append(ratelimit.build_interceptor(limits or ratelimit.RateLimits()))
    return config
