"""The grammar of --auth-token entries, TOKEN[:CLIENT[:ROLE[+ROLE][:PRIORITY]]], and the roles and
priorities they may name (security.py applies them; its docstring has the access model)."""
from __future__ import annotations

import hashlib
from typing import Iterable

#: Scheduling priorities a token or a request may carry (ExecuteRequest.priority).
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000

#: What a token may do. infer: Execute, Cancel (its own requests) and the token services; admin: LoadModel,
#: UnloadModel and Drain; metrics: scrape /metrics and WatchEvents (load and cache events across
#: tenants, for a router). ListModels and HardwareInfo only describe the worker, so infer or admin
#: may call them; Probe any role.
ROLES = ("infer", "admin", "metrics")
#: Roles of a token configured without any: the least that keeps an existing inference client
#: working. An operator upgrading grants admin explicitly (TOKEN:CLIENT:infer+admin); the refusal
#: message says so.
DEFAULT_ROLES = frozenset({"infer"})
ALL_ROLES = frozenset(ROLES)


def parse_tokens(specs: str | Iterable[str] | None) -> dict[str, str]:
    """Parses "tok1:alice,tok2" (or a list of such strings) into {token: client id}."""
    return {t: client for t, (client, _) in parse_token_specs(specs).items()}


def parse_token_roles(specs: str | Iterable[str] | None) -> dict[str, frozenset[str]]:
    """{token: roles} of the same specs (DEFAULT_ROLES where a spec names none)."""
    return {t: roles for t, (_, roles) in parse_token_specs(specs).items()}


def parse_token_priorities(specs: str | Iterable[str] | None) -> dict[str, int]:
    """{token: priority} of the same specs (0 where a spec names none)."""
    return {t: prio for t, (_, _, prio) in _parse(specs).items()}


def _priority_field(token: str, text: str) -> int:
    try:
        prio = int(text.strip())
    except ValueError:
        raise ValueError(f"--auth-token: entry for token ending {token[-4:]!r}: PRIORITY {text.strip()!r} is not an "
                         "integer (TOKEN:CLIENT:ROLES:PRIORITY; tokens may not contain ':')") from None
    if not MIN_PRIORITY <= prio <= MAX_PRIORITY:
        raise ValueError(f"--auth-token: entry for token ending {token[-4:]!r}: PRIORITY {prio} is outside "
                         f"{MIN_PRIORITY}..{MAX_PRIORITY}")
    return prio


def _split_spec(item: str) -> tuple[str, str, str, str | None, int | None]:
    """(token, separator, client, roles or None, priority or None) of
    "TOKEN[:CLIENT[:ROLE[+ROLE][:PRIORITY]]]" (ROLES may be empty before a PRIORITY: the default).

    A misspelt role must stop the worker, not quietly become part of a token or a client id, so
    tokens may not contain ':' (before roles existed one could, as "to:ken:client").
    """
    parts = item.split(":")
    priority = None
    if len(parts) == 4:
        priority = _priority_field(parts[0], parts[3])
        parts = parts[:3]
        if not parts[2].strip():
            return parts[0], ":", parts[1], None, priority
    if len(parts) > 3:
        raise ValueError(f"--auth-token: entry for token ending {parts[0][-4:]!r} has more than "
                         "TOKEN:CLIENT:ROLES fields (tokens may not contain ':')")
    if len(parts) == 3:
        unknown = [r for r in parts[2].split("+") if r.strip() not in ROLES]
        if unknown:
            raise ValueError(f"--auth-token: unknown role {unknown[0].strip()!r} for client {parts[1].strip()!r} "
                             f"(roles: {', '.join(ROLES)}, joined with '+')")
        return parts[0], ":", parts[1], parts[2], priority
    if len(parts) == 2:
        return parts[0], ":", parts[1], None, None
    return item, "", "", None, None


def parse_token_specs(specs: str | Iterable[str] | None) -> dict[str, tuple[str, frozenset[str]]]:
    """Parses "tok1:alice,tok2,tok3:ops:admin+infer" into {token: (client id, roles)}.

    A token given without an id gets "token-<8 hex of its sha256>": stable across restarts, and it
    does not reveal the token. A token given without roles gets DEFAULT_ROLES.
    """
    return {t: (client, roles) for t, (client, roles, _) in _parse(specs).items()}


def _parse(specs) -> dict[str, tuple[str, frozenset[str], int]]:
    """{token: (client id, roles, priority)} of token specs (parse_token_specs says how)."""
    if specs is None:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    out: dict[str, tuple[str, frozenset[str], int]] = {}
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            token, sep, client, role_spec, priority = _split_spec(item)
            token, client = token.strip(), client.strip()
            if not token:
                raise ValueError(f"--auth-token: entry {item!r} has an empty token")
            if any(c.isspace() for c in token):
                raise ValueError("--auth-token: tokens may not contain whitespace")
            if sep and not client and role_spec is None:
                raise ValueError(f"--auth-token: entry for token ending {token[-4:]!r} has an empty client id")
            if len(token) < 16:
                raise ValueError("--auth-token: tokens must be at least 16 characters "
                                 "(short tokens can be guessed)")
            roles = frozenset(r.strip() for r in role_spec.split("+")) if role_spec is not None else DEFAULT_ROLES
            client = client or "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
            if token in out and out[token][0] != client:
                raise ValueError(f"--auth-token: one token is listed for two client ids ({out[token][0]}, {client})")
            if token in out and out[token][1] != roles:
                raise ValueError(f"--auth-token: the token of client {client} is listed twice with different roles")
            priority = priority or 0
            if token in out and out[token][2] != priority:
                raise ValueError(f"--auth-token: the token of client {client} is listed twice with different "
                                 "priorities")
            out[token] = (client, roles, priority)
    return out
