"""`orcd serve`'s flags, the ServerConfig they make, and the checks run before a worker starts
(ports that cannot be bound, model paths outside the model directories); cli.py has the rest of
the command line."""
from __future__ import annotations

import argparse
import errno
import os
import pathlib
import re
import socket
import sys

from . import model_store, ratelimit, security
from . import speculation as _spec
from .backends.base import KV_VALUE_BYTES
from .backends.factory import BACKENDS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_tool_format(text: str) -> tuple[str, str]:
    from .tool_calls import FAMILIES

    model, _, fmt = text.rpartition("=")
    if fmt not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown tool format {fmt!r} (one of {', '.join(FAMILIES)})")
    return model, fmt


def parse_size(text: str) -> int:
    """Bytes from "24GB", "24G", "1.5GiB", "512MiB", "1000000". Units with an i are powers of
    1024, without one powers of 1000; a bare number is bytes."""
    m = _SIZE.match(text)
    if not m or (m.group(3) and not m.group(2)):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 24GB, 24GiB, 512MiB)")
    number, prefix, binary, _ = m.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"known model name or GGUF path to serve (default: {model_store.DEFAULT_MODEL}, "
                        "fetched on first use)")
    p.add_argument("--model-id", default="", help="id to serve the model under (default: file name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=50051, help="gRPC port (default: %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: CUDA when PyCUDA finds a GPU, else cpu (quantized weights, numba kernels); "
                        "numpy: the float32 reference, slow (default: %(default)s)")
    p.add_argument("--model-dir", action="append", default=None, metavar="DIR",
                   help="directory LoadModel may read from (repeatable; default: the model cache)")
    p.add_argument("--max-vram", type=parse_size, default=0, metavar="SIZE",
                   help="most VRAM the worker may use, e.g. 24GB or 20GiB (default: all)")
    p.add_argument("--max-ram", type=parse_size, default=0, metavar="SIZE",
                   help="most host RAM the CPU backend may use, e.g. 8GB (default: the machine's "
                        "available memory less a margin, read at each load)")
    p.add_argument("--context-length", type=int, default=0,
                   help="tokens per sequence; 0: the model's own, capped (default: 0)")
    p.add_argument("--kv-cache-type", choices=sorted(KV_VALUE_BYTES), default=None,
                   help="the KV cache's element for loads that name none: f16, q8_0 (GGML's 8-bit blocks, "
                        "53%% of f16's bytes; cpu and cuda) or f32 (cpu, numpy) (default: the backend's, f16 on "
                        "cpu and cuda)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap on any loaded model's context length in tokens (default: none)")
    p.add_argument("--max-sequences", type=_positive_int, default=None,
                   help="most requests decoding at once (default: the server's, 64)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting to run; more get RESOURCE_EXHAUSTED (default: 256)")
    p.add_argument("--token-budget", type=_positive_int, default=None,
                   help="most tokens one engine step carries: every decode row, then prompt chunks up to "
                        "it (bounded too by the step workspace); larger starts prompts sooner, smaller keeps "
                        "each running request's time per token lower (default: 2048)")
    p.add_argument("--max-samples", type=_positive_int, default=None,
                   help="most parallel samples (ExecuteRequest.n) one request may ask for; each counts "
                        "against --max-sequences and the token rate limit (default: 16)")
    p.add_argument("--http-port", type=_port, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /metrics, /health) on this port of --host, with the gRPC port's TLS, "
                        "tokens and rate limits (default: off)")
    p.add_argument("--metrics-port", type=_port, default=None,
                   help="serve Prometheus metrics (and GET /healthz) on this port (default: off); "
                        "HTTPS when --tls-cert is set, /metrics needs a metrics-role token when one is configured")
    p.add_argument("--metrics-host", default=None,
                   help="address for the metrics port (default: the --host address); off loopback it needs "
                        "TLS and a TOKEN:CLIENT:metrics token, or --insecure")
    p.add_argument("--frontends", type=int, default=None, metavar="N",
                   help="N front-end processes on the same port carry clients' connections and relay their "
                        "calls to the worker, spreading gRPC's per-message work over cores (default: 0, none)")
    p.add_argument("--grace-seconds", type=float, default=None,
                   help="on SIGTERM, how long running requests may finish (default: 30)")
    p.add_argument("--max-prompt-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="refuse prompt text (text, or chat contents in total) larger than this before "
                        "tokenizing it, e.g. 4MiB; 0: no cap beyond the context (default: 2MiB)")
    p.add_argument("--tool-format", action="append", type=parse_tool_format, default=None,
                   metavar="[MODEL_ID=]FORMAT",
                   help="tool-call format (hermes, llama3, harmony) of a model, or of every model without "
                        "MODEL_ID=, over the one detected from its chat template; repeatable")
    p.add_argument("--speculation", choices=("off", "ngram", "draft"), default=None,
                   help="speculative decoding of requests that do not choose (ExecuteRequest.speculation): "
                        "ngram drafts by prompt lookup, draft by --draft-model, verified in one step (default: off)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a smaller GGUF with the startup model's vocabulary, loaded beside it for draft-model "
                        "speculation (default: none)")
    p.add_argument("--num-draft-tokens", type=_positive_int, default=None, metavar="K",
                   help=f"draft tokens per speculative step, 1..{_spec.MAX_DRAFT_TOKENS} "
                        f"(default: {_spec.DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    # --tls-cert/--tls-key/--tls-client-ca, --auth-token TOKEN[:CLIENT[:ROLES]] (repeatable), --insecure
    # and the per-client --rate-limit-* flags; each falls back to its environment variable.
    security.add_arguments(p)
    ratelimit.add_arguments(p)


# --- commands --------------------------------------------------------------------------------


def server_config(args: argparse.Namespace):
    """The ServerConfig for `orcd serve` from its parsed flags (fetching the default model).

    Raises ValueError (security.ExposureError among them) for inconsistent TLS, token or rate-limit
    settings and for a non-loopback listener without TLS and a token; these are checked before the
    model is fetched."""
    from .server import ServerConfig

    sec = security.config_from_args(args)
    limits = ratelimit.limits_from_args(args)
    security.check_exposure(args.host, sec.tls, sec.tokens, sec.insecure)
    if args.metrics_port is not None:
        security.check_metrics_exposure(args.metrics_host if args.metrics_host is not None else args.host, sec)
    model_dirs = [os.path.abspath(d) for d in (args.model_dir or [str(model_store.model_dir())])]
    model = model_store.resolve_model(args.model or model_store.DEFAULT_MODEL, search_dirs=model_dirs,
                                      verbose=True)
    # The server loads only files inside its model dirs; the model named on the command line is
    # allowed by naming it, so its directory joins the list.
    if not any(_inside(model, d) for d in model_dirs):
        model_dirs.append(str(model.parent))
    values = dict(host=args.host, port=args.port, model_path=str(model), model_id=args.model_id or None,
                  backend=args.backend, model_dirs=model_dirs, max_vram=args.max_vram, max_ram=args.max_ram,
                  context_length=args.context_length, max_context=args.max_context,
                  max_sequences=args.max_sequences, max_queue=args.max_queue,
                  token_budget=getattr(args, "token_budget", None),
                  max_samples=getattr(args, "max_samples", None),
                  metrics_port=args.metrics_port, metrics_host=args.metrics_host, grace_seconds=args.grace_seconds,
                  max_prompt_bytes=getattr(args, "max_prompt_bytes", None), log_level=args.log_level,
                  tool_formats=dict(args.tool_format) if getattr(args, "tool_format", None) else None,
                  http_port=getattr(args, "http_port", None),
                  speculation=_speculation(getattr(args, "speculation", None), getattr(args, "num_draft_tokens", None),
                                           getattr(args, "draft_model", None)),
                  draft_model_path=_draft_path(getattr(args, "draft_model", None), model_dirs),
                  kv_cache_type=getattr(args, "kv_cache_type", None), frontends=getattr(args, "frontends", None))
    # Flags left unset keep the server's own defaults.
    cfg = ServerConfig(**{k: v for k, v in values.items() if v is not None})
    return security.apply_to_server_config(cfg, sec, limits)


def _speculation(mode: str | None, k: int | None, draft_model: str | None = None):
    """--speculation and --num-draft-tokens as the server's default (None: off)."""
    if k is not None and not 1 <= k <= _spec.MAX_DRAFT_TOKENS:
        raise ValueError(f"--num-draft-tokens must be in [1, {_spec.MAX_DRAFT_TOKENS}], got {k}")
    if mode == _spec.DRAFT and not draft_model:
        raise ValueError("--speculation draft needs --draft-model")
    if mode in (None, _spec.OFF):
        if k is not None:
            raise ValueError("--num-draft-tokens needs --speculation ngram")
        return None
    return _spec.Speculation(mode, k or _spec.DEFAULT_DRAFT_TOKENS).check("--speculation")


def _draft_path(path: str | None, model_dirs: list[str]) -> str | None:
    """--draft-model as a path the worker may load (its directory joins the model dirs)."""
    if not path:
        return None
    p = pathlib.Path(path).resolve()
    if not p.is_file():
        raise ValueError(f"--draft-model {path}: no such file")
    if not any(_inside(p, d) for d in model_dirs):
        model_dirs.append(str(p.parent))
    return str(p)


def _inside(path, directory) -> bool:
    try:
        pathlib.Path(path).resolve().relative_to(pathlib.Path(directory).resolve())
    except ValueError:
        return False
    return True


def cmd_serve(args) -> int:
    from .server import BindError, serve

    try:
        # A port in use is found before the model is fetched and loaded, not after.
        check_bindable(args.host, args.port, "--port")
        if args.metrics_port is not None:
            check_bindable(args.metrics_host if args.metrics_host is not None else args.host, args.metrics_port,
                           "--metrics-port")
        if getattr(args, "http_port", None) is not None:
            check_bindable(args.host, args.http_port, "--http-port")
        cfg = server_config(args)
        return serve(cfg)
    except (ValueError, BindError) as exc:  # bad TLS/token/rate-limit settings, an exposed
        # listener without them, or a port that another process took after the check above
        print(f"error: {exc}", file=sys.stderr)
        return 2


def check_bindable(host: str, port: int, flag: str) -> None:
    """Raises server.BindError when no address of `host` can listen on `port`, as the server
    would find out only after loading its model (with grpc's log line and a traceback)."""
    from .server import BindError

    if not port:
        return
    try:
        addrs = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    first = None
    for family, kind, proto, _, sockaddr in addrs:
        with socket.socket(family, kind, proto) as s:
            # As the gRPC and HTTP servers bind: a port left in TIME_WAIT is free, one listened on is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
                return
            except OSError as exc:
                first = first or exc
    why = "the port is in use" if first is not None and first.errno == errno.EADDRINUSE else (
        first.strerror if first is not None else "no address")
    raise BindError(f"{flag}: cannot listen on {host}:{port}: {why}")
