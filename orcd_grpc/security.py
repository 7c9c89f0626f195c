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
counters and logs, so the secret itself is never logged or used as a metric label. It may also
carry roles ("secret:alice:infer+admin", ROLES): a token without roles may only infer, because
a token handed to an application must not be able to replace the model everyone is served.
And it may carry a scheduling priority ("secret:alice:infer:10", -1000..1000, default 0): the
client's requests run at it unless one asks for less (ExecuteRequest.priority); none may ask for
more, so a token decides how far ahead of other clients its holder may queue.
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import socket
from typing import Mapping

import grpc

from .call_hooks import NO_HOOKS, Hooks, Policy

# the token specs' grammar and the roles they name (re-exported: the configuration's vocabulary)
from .token_specs import (ALL_ROLES, DEFAULT_ROLES, MAX_PRIORITY, MIN_PRIORITY, ROLES, _parse,  # noqa: F401
                          parse_token_priorities, parse_token_roles, parse_token_specs, parse_tokens)

#: Methods any caller may use: load balancers and orchestrators probe health without credentials,
#: and reflection only describes the API (it exposes no data).
OPEN_METHOD_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

#: The authenticated client id of the call being handled (set by AuthInterceptor on the handler's
#: thread, read by the rate limiter and anything else that wants to know who is calling).
CALL_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("orcd_call_client", default=None)
#: The priority of the call's token (set beside CALL_CLIENT); None: no tokens are configured, so
#: no caller is distinguished and a request's own priority stands.
CALL_PRIORITY: contextvars.ContextVar[int | None] = contextvars.ContextVar("orcd_call_priority", default=None)
_WORKER = "/orcd.v1.Worker/"
#: Roles that may call a method (any one suffices). A method not listed needs infer; a new
#: method that changes the worker's state must be listed here with admin.
METHOD_ROLES: dict[str, frozenset[str]] = {
    _WORKER + "LoadModel": frozenset({"admin"}),
    _WORKER + "UnloadModel": frozenset({"admin"}),
    _WORKER + "ListModels": frozenset({"infer", "admin"}),
    _WORKER + "HardwareInfo": frozenset({"infer", "admin"}),
    # The token services read the served model's tokenizer for inference clients, as Execute does.
    _WORKER + "Tokenize": frozenset({"infer"}),
    _WORKER + "Detokenize": frozenset({"infer"}),
    _WORKER + "RenderChat": frozenset({"infer"}),
    # Drain takes the worker out of service; Probe tells a caller only about its own prompt and
    # the load; WatchEvents shows every tenant's cached blocks, as /metrics shows every tenant's load.
    _WORKER + "Drain": frozenset({"admin"}),
    _WORKER + "Probe": frozenset({"infer", "admin", "metrics"}),
    _WORKER + "WatchEvents": frozenset({"metrics", "admin"}),
}

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
    # bearer token -> roles; a token missing here has DEFAULT_ROLES
    roles: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    # bearer token -> scheduling priority; a token missing here has 0
    priorities: dict[str, int] = dataclasses.field(default_factory=dict)
    insecure: bool = False            # allow a non-loopback listener without TLS + token

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def mtls(self) -> bool:
        return self.tls and bool(self.tls_client_ca)


# ---- configuration -----------------------------------------------------------------------------


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
        parser.add_argument("--auth-token", action="append", default=None,
                            metavar="TOKEN[:CLIENT[:ROLES[:PRIORITY]]]",
                            help="require 'authorization: Bearer TOKEN'; repeat or comma-separate for several, "
                                 "optionally naming each client, its roles, '+'-joined from "
                                 f"{', '.join(ROLES)} (default: infer; may be empty before PRIORITY), and its "
                                 f"scheduling priority {MIN_PRIORITY}..{MAX_PRIORITY} (default 0; requests may "
                                 f"ask for less, never more) (env {ENV_TOKENS})")
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
    specs = _parse(token_specs)
    cfg = SecurityConfig(tls_cert=pick("tls_cert", ENV_CERT), tls_key=pick("tls_key", ENV_KEY),
                         tls_client_ca=pick("tls_client_ca", ENV_CLIENT_CA),
                         tokens={t: c for t, (c, _, _) in specs.items()},
                         roles={t: r for t, (_, r, _) in specs.items()},
                         priorities={t: p for t, (_, _, p) in specs.items() if p}, insecure=bool(insecure))
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


def check_exposure(host: str, tls: bool, tokens, insecure: bool, *, action: str = "listen",
                   token: str = "a bearer token (--auth-token)", local: str = "listen on 127.0.0.1") -> None:
    """Refuses a listener reachable from other machines unless it has TLS and bearer tokens.

    Loopback listeners may run without either (local development, a sidecar). `insecure`
    overrides the refusal for deliberate setups (a private network, TLS terminated by a proxy).
    action, token, local: how the message names the listener, the token it lacks and the local
    alternative (the metrics port says its own).
    """
    if insecure or is_loopback(host):
        return
    missing = [what for what, ok in (("TLS (--tls-cert/--tls-key)", tls), (token, bool(tokens))) if not ok]
    if missing:
        raise ExposureError(
            f"refusing to {action} on {host or '0.0.0.0'} (reachable from other machines) without "
            f"{' and '.join(missing)}; configure them, {local}, or pass --insecure")


# ---- bearer tokens -----------------------------------------------------------------------------


class TokenChecker:
    """Looks up a bearer token in constant time with respect to the configured tokens."""

    def __init__(self, tokens: Mapping[str, str], roles: Mapping[str, frozenset[str]] | None = None,
                 priorities: Mapping[str, int] | None = None):
        # Compare fixed-length digests: hmac.compare_digest is constant-time only for equal
        # lengths, and the digest hides the configured tokens' lengths as well.
        roles, priorities = roles or {}, priorities or {}
        self._entries = [(hashlib.sha256(t.encode()).digest(), c, frozenset(roles.get(t, DEFAULT_ROLES)),
                          int(priorities.get(t, 0))) for t, c in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, token: str) -> tuple[str, frozenset[str]] | None:
        """(client id, roles) of `token`, or None."""
        found = self.identify(token)
        return found[:2] if found else None

    def identify(self, token: str) -> tuple[str, frozenset[str], int] | None:
        """(client id, roles, priority) of `token`, or None."""
        d = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, client, roles, priority in self._entries:  # no early exit: every token is compared
            if hmac.compare_digest(d, digest):
                found = (client, roles, priority)
        return found

    def client_for(self, token: str) -> str | None:
        found = self.lookup(token)
        return found[0] if found else None

    def with_role(self, role: str) -> "TokenChecker":
        """A checker of only the tokens that carry `role` (the metrics port's)."""
        sub = TokenChecker({})
        sub._entries = [e for e in self._entries if role in e[2]]
        return sub


def _metadata_value(md, key: str) -> str | None:
    for k, v in md or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def authenticate(checker: TokenChecker, metadata) -> tuple[grpc.StatusCode, str] | tuple[str, frozenset[str], int]:
    """The caller's (client id, roles, priority), or (status, message) to answer with."""
    auth = _metadata_value(metadata, "authorization")
    if auth is None or not auth.strip():
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: bearer token missing (send 'authorization: Bearer <token>')"
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: expected 'Bearer <token>'"
    found = checker.identify(token.strip())
    if found is None:
        return grpc.StatusCode.PERMISSION_DENIED, "authorization: bearer token is not valid"
    return found


def authorize(method: str, client: str, roles: frozenset[str]) -> str | None:
    """None when `roles` may call `method`, else the PERMISSION_DENIED message."""
    need = METHOD_ROLES.get(method, frozenset({"infer"}))
    if roles & need:
        return None
    name = method.rsplit("/", 1)[-1]
    return (f"{name} needs the {' or '.join(sorted(need))} role; the token of client {client} has "
            f"{'+'.join(sorted(roles)) or 'no roles'} (an operator grants roles as "
            f"--auth-token TOKEN:CLIENT:{'+'.join(sorted(roles | need))})")


class AuthInterceptor(Policy):
    """Checks "authorization: Bearer <token>" on every method outside OPEN_METHOD_PREFIXES, checks
    that the token's roles allow the method (METHOD_ROLES), and publishes the caller's client id
    in CALL_CLIENT for the handler (and the rate limiter).

    CALL_CLIENT is set at the start of every checked call, so a value left on a pool thread by an
    abandoned stream can never be read as the identity of a later call.
    """

    def __init__(self, tokens: Mapping[str, str], open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES,
                 roles: Mapping[str, frozenset[str]] | None = None, priorities: Mapping[str, int] | None = None):
        self._checker = TokenChecker(tokens, roles, priorities)
        self._open = open_prefixes

    @property
    def checker(self) -> TokenChecker:
        """The tokens and roles this interceptor accepts (the HTTP front door checks the same)."""
        return self._checker

    def begin_for(self, handler_call_details):
        if not self._checker or handler_call_details.method.startswith(self._open):
            return None
        verdict = authenticate(self._checker, handler_call_details.invocation_metadata)
        if isinstance(verdict[0], str):
            denied = authorize(handler_call_details.method, verdict[0], verdict[1])
            if denied is not None:
                verdict = (grpc.StatusCode.PERMISSION_DENIED, denied)

        def begin(request, context) -> Hooks:
            if not isinstance(verdict[0], str):
                context.abort(*verdict)
            CALL_CLIENT.set(verdict[0])
            CALL_PRIORITY.set(verdict[2])
            return NO_HOOKS

        return begin


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
    try:
        peer = context.peer() or "unknown"
    except NotImplementedError:  # grpc_testing's context has no peer
        peer = "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]").replace("%25", "%")
    return peer


def client_identity(context, metadata=None) -> str:
    """Whom a call is accounted to (rate limits, usage) and whose request ids it may see and
    cancel: the bearer token's client id, else the verified client certificate's CN, else the
    peer's address.

    A declared x-client-id header is not an identity: it is not authenticated, so a caller could
    rotate it to escape its rate limit or name another caller to cancel that caller's requests.
    `metadata` is accepted for callers of the older signature and not used."""
    client = CALL_CLIENT.get()
    if client:
        return client
    cn = peer_common_name(context)
    if cn:
        return f"cn:{cn}"
    return f"peer:{peer_host(context)}"


def build_interceptors(cfg: SecurityConfig) -> list[grpc.ServerInterceptor]:
    """The interceptors the server should install for `cfg` (empty without tokens)."""
    return [AuthInterceptor(cfg.tokens, roles=cfg.roles, priorities=cfg.priorities)] if cfg.tokens else []


def check_metrics_exposure(host: str, sec: SecurityConfig, tokens=None, roles=None) -> None:
    """The exposure policy for the metrics port: reachable from other machines, it needs TLS (the
    server's certificate) and a token with the metrics role, unless `insecure`. The scrape shows
    client ids, models and load, which are not for anyone on the network."""
    tokens = sec.tokens if tokens is None else tokens
    roles = sec.roles if roles is None else roles
    scrapers = [t for t in tokens if "metrics" in roles.get(t, DEFAULT_ROLES)]
    check_exposure(host, sec.tls, scrapers, sec.insecure, action="serve metrics",
                   token="a token with the metrics role (--auth-token TOKEN:CLIENT:metrics)",
                   local="set --metrics-host 127.0.0.1")


def apply_to_server_config(config, sec: SecurityConfig, limits=None):
    """Fills a server.ServerConfig's hooks from `sec` (and optional ratelimit.RateLimits):
    refuses an exposed plaintext/unauthenticated listener (ExposureError), gRPC or metrics, sets
    `credentials` and the metrics port's TLS and scrape tokens, and appends the auth interceptor
    and the rate-limit/usage interceptor to `interceptors`.

    A token already in config.auth_token (the CLI's single-token flag) joins the configured tokens
    under client id "default" with every role (one shared secret cannot separate duties) and
    config.auth_token is cleared, so that one interceptor checks every token and the call is not
    authenticated twice.
    """
    from . import ratelimit

    tokens, roles = dict(sec.tokens), dict(sec.roles)
    if getattr(config, "auth_token", None):
        tokens.setdefault(config.auth_token, "default")
        roles.setdefault(config.auth_token, ALL_ROLES)
        config.auth_token = None
    check_exposure(config.host, sec.tls, tokens, sec.insecure)
    if getattr(config, "metrics_port", None) is not None:
        mhost = config.metrics_host if config.metrics_host is not None else config.host
        check_metrics_exposure(mhost, sec, tokens, roles)
        # The metrics port speaks the gRPC port's transport; /metrics takes the metrics-role
        # tokens whenever any is configured, loopback or not.
        config.metrics_tls = (sec.tls_cert, sec.tls_key) if sec.tls else None
        scrapers = TokenChecker(tokens, roles).with_role("metrics")
        config.metrics_auth = scrapers if scrapers else None
    if getattr(config, "http_port", None) is not None:
        # The HTTP front door listens on the gRPC host, under the same TLS (client CA included);
        # its /metrics, like the metrics port's, takes metrics-role tokens once any token exists.
        config.http_tls = (sec.tls_cert, sec.tls_key, sec.tls_client_ca) if sec.tls else None
        config.http_metrics_auth = TokenChecker(tokens, roles).with_role("metrics") if tokens else None
    config.credentials = server_credentials(sec)
    if hasattr(config, "tls_files"):  # the front-end processes load the same files (ServerConfig.frontends)
        config.tls_files = (sec.tls_cert, sec.tls_key, sec.tls_client_ca) if sec.tls else None
    if tokens:
        config.interceptors.append(AuthInterceptor(tokens, roles=roles, priorities=sec.priorities))
    # Usage is counted even without limits; the server binds the counters to its registry.
    config.interceptors.append(ratelimit.build_interceptor(limits or ratelimit.RateLimits()))
    return config
